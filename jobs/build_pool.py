"""Build a preference pool: N images per prompt from your model, ranked by PickScore (HG-DPO §3.1).

Local (starts Ray itself; the embedded default model when none is named):

    python jobs/build_pool.py --config examples/pool.yaml
    python jobs/build_pool.py --config pool.yaml images_per_prompt=8 output=/data/pool
    python jobs/build_pool.py --config examples/pool.yaml --no-ray     # one process, no Ray

On a Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/build_pool.py --config pool.yaml

Rerunning the same command finishes an interrupted pool; on a finished pool it checks that every
part has the size its manifest records and, if one is missing or cut short, deletes it and builds
only that part's prompts again; otherwise it does nothing. `--verify` also reads every part and
checks its sha256 (a part altered without changing size), repairing the same way:

    python jobs/build_pool.py --config pool.yaml --verify

(`hgdpo verify <pool>` checks a pool without repairing it.)
Settings: `python jobs/build_pool.py --help`, or docs/settings.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("pool", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
