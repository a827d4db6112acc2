"""The paper's tables in the miniature world: one pool, every table's trials, one report.

On the embedded default, in about two hours on two CPU cores:

    python jobs/replicate.py --config examples/replicate.yaml
    python jobs/replicate.py --config examples/replicate.yaml report=docs/replication.md
    python jobs/replicate.py --config examples/replicate.yaml only=[hgdpo,n=2]    # two trials of Table 3

Settings are overridden as key=value and a stage's as section.key=value (pool., train., evaluate.;
train and evaluate are every trial's base settings). The pool is written to <output>/pool, the
trials to <output>/sweep, Fig. 5a's agreement to <output>/agreement.json and the report (default
<output>/replication.md) with its pictures beside it. Rerunning the command does no finished work
again: the pool and the sweep resume, and the report is written anew from what is there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.config import describe, from_dict, parse_overrides, read_yaml  # noqa: E402
from hgdpo.errors import HgdpoError  # noqa: E402
from hgdpo.replicate import ReplicateConfig  # noqa: E402
from hgdpo.run import merge, nest_overrides  # noqa: E402


def load(path: str | None, overrides: list[str]) -> ReplicateConfig:
    data = read_yaml(path) if path else {}
    return from_dict(ReplicateConfig, merge(data, nest_overrides(parse_overrides(overrides))), path or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="settings:\n" + describe(ReplicateConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value settings that override the file")
    args = parser.parse_intermixed_args(argv)
    try:
        from hgdpo.quiet import quiet_libraries
        from hgdpo.replicate import replicate

        quiet_libraries()
        location = replicate(load(args.config, args.overrides))
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nreplicate: the report is {location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
