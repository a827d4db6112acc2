"""Keep library chatter (progress bars of weight loading, deprecation notes) out of job output."""

from __future__ import annotations

import os
import sys
import warnings


def quiet_libraries() -> None:
    """Quiet the libraries, and make a job's own progress lines visible as they are printed."""
    # stdout is a pipe under `ray job submit` or `> log`: without line buffering the progress
    # lines would appear only when the buffer fills or the job ends.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*steps_offset.*")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
