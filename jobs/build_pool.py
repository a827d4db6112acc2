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
Settings: `python jobs/build_pool.py --help`, or the README's configuration reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.config import describe, load_config  # noqa: E402
from hgdpo.errors import HgdpoError  # noqa: E402
from hgdpo.pool_config import PoolConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="settings:\n" + describe(PoolConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    parser.add_argument("--no-mlflow", action="store_true", help="do not record the run in MLflow")
    parser.add_argument("--no-ray", action="store_true",
                        help="build in this process without Ray (one model, torch's threads): the reference path")
    parser.add_argument("--verify", action="store_true",
                        help="on a finished pool, read every part and check its checksum; rebuild the bad ones")
    args = parser.parse_intermixed_args(argv)
    try:
        from hgdpo.pool_builder import build_pool
        from hgdpo.quiet import quiet_libraries

        quiet_libraries()
        cfg = load_config(PoolConfig, args.config, args.overrides)
        result = build_pool(cfg, mlflow=not args.no_mlflow, local=args.no_ray, verify=args.verify)
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not result.skipped:
        print(f"pool: {result.built} prompts built in {result.seconds:.1f}s ({result.images_per_second:.2f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
