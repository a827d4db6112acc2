"""Sweep the paper's ablations on Ray Tune: per trial, train on one pool and evaluate against the base model.

Local (starts Ray itself), on the pool the end-to-end demo writes (runs/demo/pool):

    python jobs/sweep.py --config sweeps/pool_size.yaml
    python jobs/sweep.py --config sweeps/beta_sml.yaml train.max_steps=100 max_concurrent_trials=1

On a Ray cluster (trials run side by side as the cluster's CPUs and GPUs allow):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/sweep.py --config sweeps/pool_size.yaml pool=s3://bucket/pools/p output=s3://... \\
        train.workers=4 train.gpus_per_worker=1 mlflow_uri=http://mlflow:5000

Settings are overridden as key=value, and a stage's base settings as train.key=value or
evaluate.key=value. Each trial writes <output>/trials/<trial>/{train,eval}; baseline B's images
and scores are made once, into <output>/baseline, and trials of the same training share one
adapter. MLflow gets a parent run named after the sweep with one nested run per trial, opened
when the trial starts. Rerunning the same command runs only the trials that have not finished.
The table is printed at the end; `hgdpo table --sweep NAME` prints it again from MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.config import describe, from_dict, parse_overrides, read_yaml  # noqa: E402
from hgdpo.errors import ConfigError, HgdpoError  # noqa: E402
from hgdpo.sweep_config import SweepConfig  # noqa: E402

SECTIONS = ("train", "evaluate")


def load(path: str | None, overrides: list[str]) -> SweepConfig:
    """The sweep's YAML with ``key=value`` / ``train.key=value`` / ``evaluate.key=value`` on top."""
    data = read_yaml(path) if path else {}
    for key, value in parse_overrides(overrides).items():
        section, dot, name = key.partition(".")
        if dot:
            if section not in SECTIONS:
                raise ConfigError(f"override {key}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
            if not isinstance(data.get(section, {}), dict):
                raise ConfigError(f"{path}: sweep.{section}: expected a mapping of settings")
            data[section] = {**data.get(section, {}), name: value}
        else:
            data[key] = value
    return from_dict(SweepConfig, data, path or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="settings:\n" + describe(SweepConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of the sweep")
    parser.add_argument("overrides", nargs="*", help="key=value or train.key=value / evaluate.key=value settings")
    args = parser.parse_intermixed_args(argv)
    try:
        from hgdpo.quiet import quiet_libraries
        from hgdpo.sweep import sweep

        quiet_libraries()
        cfg = load(args.config, args.overrides)
        result = sweep(cfg)
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ran = [t.name for t in result.trials if not t.skipped]
    print()
    print(result.table())
    print(f"\nsweep {result.name}: {len(ran)} trial(s) run, {len(result.trials) - len(ran)} finished earlier; "
          f"everything under {result.output}; MLflow parent run {result.parent_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
