"""Train LoRA adapters with HG-DPO (Diffusion-DPO + statistic matching) on a pool, on Ray Train.

Local (starts Ray itself):

    python jobs/train.py --config examples/train.yaml
    python jobs/train.py --config train.yaml workers=2 objective=dpo output=runs/dpo

On a Ray cluster (one worker per GPU):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train.py --config train.yaml workers=8 gpus_per_worker=1

The adapter is written to <output>/adapter in the diffusers LoRA format
(``StableDiffusionPipeline.load_lora_weights`` loads it). Rerunning the same command resumes
from the last checkpoint; on a finished run it does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("train", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
