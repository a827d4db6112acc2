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

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.config import describe, from_dict, parse_overrides, read_yaml  # noqa: E402
from hgdpo.errors import HgdpoError  # noqa: E402
from hgdpo.run import RunConfig, merge, nest_overrides  # noqa: E402


def load(path: str | None, overrides: list[str]) -> RunConfig:
    """The run's YAML with ``key=value`` / ``section.key=value`` overrides on top."""
    data = read_yaml(path) if path else {}
    return from_dict(RunConfig, merge(data, nest_overrides(parse_overrides(overrides))), path or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="settings:\n" + describe(RunConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value settings that override the file")
    args = parser.parse_intermixed_args(argv)
    try:
        from hgdpo.evaluate import table
        from hgdpo.quiet import quiet_libraries
        from hgdpo.run import run

        quiet_libraries()
        cfg = load(args.config, args.overrides)
        result = run(cfg)
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(table(cfg.stages()[2], result.evaluation))
    print(f"\nrun: pool {result.pool_seconds:.0f}s, train {result.train_seconds:.0f}s, "
          f"evaluate {result.evaluate_seconds:.0f}s; everything under {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
