"""Export a pool's pairs as one Pick-a-Pic-style parquet file, for other Diffusion-DPO tools.

Columns caption, jpg_0 (the winner), jpg_1 (the loser), label_0 = 1, label_1 = 0, model_0, model_1, ...:
the layout the diffusers Diffusion-DPO example and Salesforce's DiffusionDPO read.

    python jobs/export_pairs.py pool=runs/demo/pool output=runs/export/demo-pairs.parquet
    python jobs/export_pairs.py pool=s3://bucket/pools/p output=s3://bucket/exports/p.parquet

On a Ray cluster it needs no workers (one process streams the pool part by part):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/export_pairs.py pool=s3://bucket/pools/p output=s3://bucket/exports/p.parquet

The file is written whole or not at all. `python jobs/import_pairs.py source=<file>` reads it back.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("export", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
