"""The paper's tables in the miniature world: one pool, every table's trials, one report.

On the embedded default, in about two hours on two CPU cores:

    python jobs/replicate.py --config examples/replicate.yaml
    python jobs/replicate.py --config examples/replicate.yaml report=docs/replication.md
    python jobs/replicate.py --config examples/replicate.yaml only=[hgdpo,n=2]    # two trials of Table 3

Settings are overridden as key=value and a stage's as section.key=value (pool., train., evaluate.;
train and evaluate are every trial's base settings). The pool is written to <output>/pool, the
trials to <output>/sweep (Table 1's public-data trials on pools imported into <output>/public),
Fig. 5a's agreement to <output>/agreement.json and the report (default <output>/replication.md)
with its pictures beside it. Rerunning the command does no finished work
again: the pool and the sweep resume, and the report is written anew from what is there.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("replicate", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
