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

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.config import describe, load_config  # noqa: E402
from hgdpo.errors import HgdpoError  # noqa: E402
from hgdpo.train_config import TrainConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="settings:\n" + describe(TrainConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    args = parser.parse_intermixed_args(argv)
    try:
        from hgdpo.quiet import quiet_libraries
        from hgdpo.trainer import train

        quiet_libraries()
        cfg = load_config(TrainConfig, args.config, args.overrides)
        result = train(cfg)
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not result.skipped:
        shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
        print(f"train: {result.steps} steps; last metrics {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
