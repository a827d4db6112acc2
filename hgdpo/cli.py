"""The ``hgdpo`` command: every stage of the method, and looking at what the jobs recorded.

    hgdpo run --config examples/run.yaml                # pool -> HG-DPO -> evaluation (the demo)
    hgdpo pool --config pool.yaml images_per_prompt=8   # each stage: the settings of jobs/<stage>.py
    hgdpo train --help                                  # a stage's settings
    hgdpo study create db=study.db source=runs/demo/evaluate items=100 raters=5 invites=invites.csv
    hgdpo table --sweep pool-size                       # from ./mlflow.db (or $MLFLOW_TRACKING_URI)
    hgdpo table --sweep pool-size --mlflow-uri http://127.0.0.1:5000
    python -m hgdpo table --sweep pool-size             # the same, without the console script
    hgdpo verify runs/demo/pool                         # or s3://bucket/pools/p
    hgdpo duel runs/a/evaluate runs/b/evaluate          # two adapters head to head, from their evaluations

The stages (``hgdpo.stages``) take ``--config FILE`` and ``key=value`` settings exactly as the scripts
in ``jobs/`` do (those stay, for ``ray job submit``), and exit 0 when done, 2 on bad input (the message
names the setting, file or row), 1 on a failure.

``table`` prints a sweep the paper's way: one row per trial with its swept parameters, the win
rate of the trial's adapter (A) over the base model (B) per scorer with its interval, and the
change of mean hue, saturation and value (paper Tables 1-3, 5, 6).

``verify`` reads every part of a pool and checks it against the pool's manifest (size, sha256,
rows, prompt ids): exit 0 when all match, else 2 with the bad parts named. Repair a bad pool by
rerunning its pool job with the same config, which rebuilds only the bad parts' prompts.

``duel`` compares two evaluations made on the same prompts and seeds (e.g. two adapters, each against
the base model): A's images of the first against A's images of the second, paired by prompt and seed,
per scorer the two had, with a bootstrap interval over prompts, and with the world's judge the
object-level differences; a sweep does the same for its neighbouring trials. Evaluations of other
prompts or seeds are refused (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from hgdpo import stages
from hgdpo.errors import exit_status

# What the commands other than the stages run, resolved when one runs (as the stages are: hgdpo.stages).
COMMANDS = {"table": "hgdpo.report.tables:table_from_mlflow", "verify": "hgdpo.inspection:verify_pool",
            "duel": "hgdpo.inspection:duel_evaluations"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in stages.STEPS:
        return stages.main_with_steps(argv[0], argv[1:])
    if argv and argv[0] in stages.STAGES:
        return stages.main(argv[0], argv[1:])
    listing = "\n".join(f"  {name:12s} {stage.summary}" for name, stage in stages.STAGES.items()
                         if " " not in name)
    listing += "\n" + "\n".join(f"  {name:12s} {{{','.join(steps)}}}: the user study" for name, steps in
                                 stages.STEPS.items())
    parser = argparse.ArgumentParser(prog="hgdpo", description=__doc__.splitlines()[0],
                                     epilog=f"stages (hgdpo STAGE --help lists its settings):\n{listing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="print a sweep's table of win rates from MLflow")
    table.add_argument("--sweep", required=True, help="the sweep's name (`name:` in its YAML file)")
    table.add_argument("--mlflow-uri", default=None,
                       help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite ./mlflow.db)")
    table.add_argument("--experiment", default="hgdpo-sweep", help="MLflow experiment of the sweep")
    verify = commands.add_parser("verify", help="read every part of a pool and check it against its manifest")
    verify.add_argument("pool", help="the pool's folder or storage URI")
    duel = commands.add_parser("duel", help="two evaluations' adapters head to head, on the same prompts and seeds")
    duel.add_argument("a", help="an evaluation's output folder or storage URI (its A images are the duel's A)")
    duel.add_argument("b", help="another evaluation's output, made on the same prompts and seeds")
    args = parser.parse_args(argv)

    work = {"table": lambda: stages.resolve(COMMANDS["table"])(args.sweep, args.mlflow_uri, args.experiment),
            "verify": lambda: stages.resolve(COMMANDS["verify"])(args.pool),
            "duel": lambda: stages.resolve(COMMANDS["duel"])(args.a, args.b)}[args.command]
    return exit_status(lambda: print(work()))


if __name__ == "__main__":
    sys.exit(main())
