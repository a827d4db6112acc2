"""Keep library chatter (progress bars of weight loading, deprecation notes, Ray's internal notices) out of
job output, so that what a job prints is its own progress, its warnings and its result.

What is left out, and why:

* Ray Data's progress dumps on a non-terminal (several lines every 10 s per dataset): the stages print
  their own progress (``pool: 120/300 prompts done``). On a terminal Ray Data keeps its one global bar.
  Its INFO notices (execution plans, "execution finished") stay in Ray's ``ray-data.log``.
* Two lines Ray repeats that say nothing about the job (``RAY_DEDUP_LOGS_SKIP_REGEX``, ``NOISE``):
  Ray Train's placement-group cleaner asks Ray's State API every second whether the training
  controller lives, and on a local Ray started without its dashboard (``hgdpo.infra.raycluster``: it costs
  memory and a port) that API is absent, so it warns "Failed to query Ray Train Controller actor
  state" at every check; and Ray Core's note that an actor with ``max_restarts > 0`` has
  constructor arguments in the object store (ray-project/ray#53727), which Ray Train's own actors
  trigger. Both stay in Ray's session logs (``/tmp/ray/session_latest/logs``).
* MLflow's INFO lines ("Creating initial MLflow database tables"): ``MLFLOW_LOGGING_LEVEL`` WARNING.
* Ray's notice that a new local cluster has token authentication on (its secure default, which the
  jobs keep). Its warning that authentication is *off* stays in.

What is left in, and why: one line per Ray Data actor pool (the pool's generators, the evaluation's
generators), "Actor with class name: 'MapWorker(MapBatches(...))' ... has constructor arguments in the
object store and max_restarts > 0". Ray Data creates every actor pool so, whatever the class (a trivial
one prints it too), and Ray's C++ core writes the line to the driver's stderr, where Python cannot filter
it. It warns that an actor restarted after its node is lost may fail to start; a stage that fails so is
rerun by its command (the pool resumes where it stopped).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

NOISE = ("Failed to query Ray Train Controller actor state",
         "constructor arguments in the object store and max_restarts > 0")


def quiet_libraries() -> None:
    """Quiet the libraries, and make a job's own progress lines visible as they are printed."""
    # stdout is a pipe under `ray job submit` or `> log`: without line buffering the progress
    # lines would appear only when the buffer fills or the job ends.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    # Read by Ray when it is imported: set before (a process that imported Ray already keeps its value).
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(NOISE))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    if not sys.stdout.isatty():  # no colour codes around the "(RayTrainWorker pid=...)" prefixes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*steps_offset.*")
    import diffusers  # late: the variables above are read when these libraries (and Ray) are imported
    import transformers  # late: as diffusers

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables", run links
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger(AUTH_LOGGER).addFilter(_drop_auth_enabled_notice)
    quiet_ray_data(sys.stdout.isatty())


AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_auth_enabled_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def quiet_ray_data(terminal: bool) -> None:
    """Ray Data in this process: its one global progress bar on a terminal, none elsewhere; its notices
    (INFO) in its log file only."""
    import ray.data  # late: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX, set by quiet_libraries, when imported

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = terminal
    context.enable_operator_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled" notes
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the console, not ray-data.log
            handler.setLevel(logging.WARNING)


def show_progress(done: int, total: int, shown_bucket: int, since: float) -> bool:
    """Whether a stage prints its progress line now: at each further 5% of its work, at its end, and a
    minute after the last line whatever the count (a long stage of a big run still says it is alive)."""
    return done >= total or done * 20 // max(total, 1) > shown_bucket or since >= 60
