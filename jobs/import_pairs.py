"""Import a preference set (Pick-a-Pic v2 parquet, HPDv2 JSON + images, an hgdpo export) as a pool of pairs.

Training, `hgdpo verify`, export and sweeps read the result like any pool.

Local (starts Ray itself; the embedded model's VAE when no model is named):

    python jobs/import_pairs.py source=/data/pickapic_v2/train output=runs/public/pickapic
    python jobs/import_pairs.py source=/data/pickapic_v2/train output=runs/public/pickapic-h subset=people
    python jobs/import_pairs.py source=/data/HPDv2/train.json images=/data/HPDv2/train output=runs/public/hpd
    python jobs/import_pairs.py --config import.yaml --no-ray          # one process, no Ray

On a Ray cluster (one encoder actor per GPU):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/import_pairs.py --config import.yaml encoder_actors=8 encoder_gpus=1

Ties are dropped and the winner goes first; every row is checked before any image is encoded.
Rerunning the same command finishes an interrupted import (only the missing parts are encoded);
on a finished one it does nothing. Train on it with `python jobs/train.py pool=<output> ...`.
Settings: `python jobs/import_pairs.py --help`, or docs/settings.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("import", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
