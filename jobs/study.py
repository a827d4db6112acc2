"""The user study (paper App. E): people choose the more natural of two images in a web app.

Create a study from an evaluation's output (A vs B) or from a pool (winner vs loser), serve it,
then read the results (human win rate with a bootstrap interval, Krippendorff's alpha, gold
flags, agreement of the AI feedback with people; files and an MLflow run) and export the votes as
a Pick-a-Pic-style preference set:

    python jobs/study.py create db=study.db source=runs/demo/evaluate items=100 raters=5 invites=invites.csv
    python jobs/study.py serve db=study.db port=8000            # bound to 127.0.0.1
    python jobs/study.py raters db=study.db study=ID add=2 invites=invites.csv
    python jobs/study.py results db=study.db study=ID output=runs/study
    python jobs/study.py export db=study.db study=ID output=runs/study/preferences.parquet

A team's database: db=postgresql://user@dbhost:5432/studies (password from $PGPASSWORD).
Each step takes `--config FILE.yaml` and key=value settings; `python jobs/study.py STEP --help`
lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main_with_steps  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return main_with_steps("study", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
