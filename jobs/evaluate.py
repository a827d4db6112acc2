"""Evaluate model A against baseline B by win rates per scorer and colour shift (paper §4).

Local (starts Ray itself), the adapter of an example run against the base model:

    python jobs/evaluate.py --config examples/evaluate.yaml
    python jobs/evaluate.py --config examples/evaluate.yaml adapter=runs/dpo/adapter output=runs/eval-dpo

On a Ray cluster (generator and scorer actors on GPUs):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/evaluate.py --config evaluate.yaml generator_actors=4 generator_gpus=1

The paper's setting: prompts PartiPrompts.tsv with category=People (177 prompts), scorers
pickscore, hpsv2, imagereward, aesthetic, clip. Results go to <output> (report.json, table.md,
scores.parquet, side_by_side.png) and to MLflow; the table is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.config import describe, load_config  # noqa: E402
from hgdpo.errors import HgdpoError  # noqa: E402
from hgdpo.eval_config import EvalConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="settings:\n" + describe(EvalConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    parser.add_argument("--no-mlflow", action="store_true", help="do not record the run in MLflow")
    args = parser.parse_intermixed_args(argv)
    try:
        from hgdpo.evaluate import evaluate, table
        from hgdpo.quiet import quiet_libraries

        quiet_libraries()
        cfg = load_config(EvalConfig, args.config, args.overrides)
        result = evaluate(cfg, record_mlflow=not args.no_mlflow)
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(cfg, result))
    if not result.skipped:
        print(f"evaluate: {result.comparisons} comparisons in {result.seconds:.1f}s -> {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
