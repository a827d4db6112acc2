"""Evaluate model A against baseline B by win rates per scorer and colour shift (paper §4).

Local (starts Ray itself), the adapter of an example run against the base model:

    python jobs/evaluate.py --config examples/evaluate.yaml
    python jobs/evaluate.py --config examples/evaluate.yaml adapter=runs/dpo/adapter output=runs/eval-dpo

On a Ray cluster (generator and scorer actors on GPUs):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/evaluate.py --config evaluate.yaml generator_actors=4 generator_gpus=1

The paper's setting: prompts PartiPrompts.tsv with category=People (177 prompts), scorers
pickscore, hpsv2, imagereward, aesthetic, clip. Results go to <output> (report.json, table.md,
scores.parquet, side_by_side.png) and to MLflow; the table is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
