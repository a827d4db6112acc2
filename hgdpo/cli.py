"""The ``hgdpo`` command: looking at what the jobs recorded.

    hgdpo table --sweep pool-size                       # from ./mlflow.db (or $MLFLOW_TRACKING_URI)
    hgdpo table --sweep pool-size --mlflow-uri http://127.0.0.1:5000
    python -m hgdpo table --sweep pool-size             # the same, without the console script

``table`` prints a sweep the paper's way: one row per trial with its swept parameters, the win
rate of the trial's adapter (A) over the base model (B) per scorer with its interval, and the
change of mean hue, saturation and value (paper Tables 1-3, 5, 6).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hgdpo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="print a sweep's table of win rates from MLflow")
    table.add_argument("--sweep", required=True, help="the sweep's name (`name:` in its YAML file)")
    table.add_argument("--mlflow-uri", default=None,
                       help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite ./mlflow.db)")
    table.add_argument("--experiment", default="hgdpo-sweep", help="MLflow experiment of the sweep")
    args = parser.parse_args(argv)

    from hgdpo.errors import HgdpoError

    try:
        if args.command == "table":
            from hgdpo.sweep import table_from_mlflow

            print(table_from_mlflow(args.sweep, args.mlflow_uri, args.experiment))
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
