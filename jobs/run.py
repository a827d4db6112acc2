"""The whole method on one command: build a pool, train HG-DPO, evaluate it against the base model.

On the embedded default (the miniature world; no GPU, no model hub), in about a quarter of an hour
on two CPU cores:

    python jobs/run.py --config examples/run.yaml
    python jobs/run.py --config examples/run.yaml output=runs/demo-small pool.images_per_prompt=4 train.max_steps=100

Stage settings are overridden as section.key=value (pool., train., evaluate.). The pool is written
to <output>/pool, the adapter to <output>/train/adapter and the evaluation to <output>/evaluate;
rerunning the command finishes an interrupted run. The evaluation's table is printed at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("run", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
