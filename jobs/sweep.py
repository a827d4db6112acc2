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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from hgdpo.stages import main as run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_stage("sweep", argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
