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

from hgdpo.errors import HgdpoError


def main(argv: list[str] | None = None) -> int:
    from hgdpo import stages

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

    try:
        if args.command == "table":
            from hgdpo.sweep.sweep import table_from_mlflow

            print(table_from_mlflow(args.sweep, args.mlflow_uri, args.experiment))
        elif args.command == "verify":
            print(verify_pool(args.pool))
        elif args.command == "duel":
            print(duel_evaluations(args.a, args.b))
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def verify_pool(location: str) -> str:
    """``hgdpo verify``: the pool's summary when every part is as its manifest records it."""
    from hgdpo.infra import storage
    from hgdpo.pool import store as pool

    storage.check_reachable(location, "pool")
    with storage.errors("pool", location):
        report = pool.verify(location)
    checked = "size, sha256, rows and prompt ids" if report["checksums"] else \
        "rows and prompt ids (its manifest predates checksums: rerun the pool job to record them)"
    return (f"pool: {location}: {report['rows']} prompts in {report['parts']} parts ({report['bytes'] / 1e6:.1f} MB), "
            f"every part's {checked} as recorded")


def duel_evaluations(a: str, b: str) -> str:
    """``hgdpo duel``: the head-to-head tables of evaluation ``a``'s A images against evaluation ``b``'s, on the
    scorers both have, with ``a``'s bootstrap settings."""
    from hgdpo.infra import storage
    from hgdpo.sweep.sweep import compare_outputs, format_comparisons

    configs = []
    for setting, location in (("duel A", a), ("duel B", b)):
        storage.check_reachable(location, setting)
        report = storage.join(location, "report.json")
        if not storage.exists(report):
            raise HgdpoError(f"{setting}: {location} is not a finished evaluation (no report.json)")
        with storage.errors(setting, location):
            configs.append(storage.read_json(report, "evaluation report")["config"])
    scorers = [s for s in configs[0]["scorers"] if s in configs[1]["scorers"]]
    if not scorers:
        raise HgdpoError(f"duel: the evaluations have no scorer in common ({configs[0]['scorers']} and "
                         f"{configs[1]['scorers']})")
    ev = configs[0]
    with storage.errors("duel", f"{a}, {b}"):
        found = compare_outputs(a, b, scorers, resamples=ev["bootstrap"], confidence=ev["confidence"], seed=ev["seed"])
    if found is None:
        raise HgdpoError(f"duel: {a} and {b} were not made on the same prompts and seeds (prompt ids, image "
                         "indices and seeds must match one to one)")
    return format_comparisons([(a, b, *found)], scorers)


if __name__ == "__main__":
    sys.exit(main())
