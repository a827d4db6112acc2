"""The trainer end to end on the embedded default: adapter, metrics, DDP equivalence, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hgdpo.lora import ADAPTER_FILE, INFO_FILE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import build_pool  # noqa: E402
import train as train_job  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
           "a yellow circle at the bottom", "a purple square in the center", "a black triangle on the left",
           "a red square above a blue circle", "a green circle left of a yellow square"]
# Small, fast and non-trivial: 4 pairs per step in 2 shards, 2 pairs per forward.
BASE = ["global_batch=4", "micro_batch=2", "data_shards=2", "learning_rate=1e-3", "lora_rank=4",
        "metrics_every=1"]


@pytest.fixture(scope="module")
def work(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert build_pool.main([f"prompts={tmp / 'prompts.txt'}", f"output={tmp / 'pool'}", "images_per_prompt=4",
                            "steps=4", "rows_per_file=4", "--no-mlflow"]) == 0
    return tmp


def run(work: Path, name: str, *extra: str) -> int:
    return train_job.main([f"pool={work / 'pool'}", f"output={work / name}", *BASE,
                           f"mlflow_uri=sqlite:///{work / 'mlflow.db'}", *extra])


def adapter(work: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(work / name / "adapter" / ADAPTER_FILE))


def assert_same_adapter(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


@pytest.fixture(scope="module")
def one_worker(work):
    assert run(work, "w1", "max_steps=6", "checkpoint_every=3") == 0
    return adapter(work, "w1")


def test_adapter_is_written_in_diffusers_format_and_loads_into_a_plain_pipeline(work, one_worker):
    from diffusers import StableDiffusionPipeline

    from hgdpo import embedded, models

    out = work / "w1" / "adapter"
    info = json.loads((out / INFO_FILE).read_text())
    assert info["config"]["objective"] == "hgdpo" and info["plan"]["pool_size"] == 4
    assert info["base_model"]["fingerprint"] == models.fingerprint(models.resolve_model("embedded"))
    assert any(k.startswith("unet.") and "lora" in k for k in one_worker)
    assert len([k for k in one_worker if k.endswith("lora.down.weight") or k.endswith("lora_A.weight")]) > 0
    pipe = StableDiffusionPipeline.from_pretrained(embedded.pipeline_dir(), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle on the left", num_inference_steps=4, output_type="np", height=64, width=64)
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(out))
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(tuned - base).max() > 1e-4  # the trained adapter changes the images


def test_metrics_reach_mlflow(work, one_worker):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hgdpo-train")
    run_ = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("output") == str(work / "w1"))
    for name in ("loss", "dpo", "stat", "accuracy", "reward_margin", "policy_err_w", "policy_err_l", "ref_err_w",
                 "ref_err_l", "grad_norm", "lr", "pairs_per_s"):
        history = client.get_metric_history(run_.info.run_id, name)
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6], name
    losses = [m.value for m in client.get_metric_history(run_.info.run_id, "dpo")]
    assert abs(losses[0] - 0.6931) < 0.01  # step 1: policy == reference, so the DPO loss is log 2
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id, "adapter")}
    assert f"adapter/{ADAPTER_FILE}" in artifacts


def test_two_workers_give_the_adapter_of_one(work, one_worker):
    assert run(work, "w2", "max_steps=6", "checkpoint_every=3", "workers=2") == 0
    # Same global batches and noise; only the order of float sums differs.
    assert_same_adapter(adapter(work, "w2"), one_worker, rtol=1e-4, atol=1e-6)


def test_rerun_of_finished_training_does_nothing(work, one_worker, capsys):
    assert run(work, "w1", "max_steps=6", "checkpoint_every=3") == 0
    assert "already trained with this config; nothing to do" in capsys.readouterr().out
    assert run(work, "w1", "max_steps=6", "checkpoint_every=3", "beta=5000") == 2
    assert "holds an adapter trained with another config" in capsys.readouterr().err


def _kill_worker_after(checkpoint: Path, killed: list) -> None:
    """SIGKILL the Ray Train worker process once ``checkpoint`` exists (as a node failure would)."""
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "ray::RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            killed.append(proc.info["pid"])
            return


def test_a_worker_that_dies_is_replaced_and_the_run_ends_as_an_uninterrupted_one(work):
    steps = ["max_steps=12", "checkpoint_every=3"]
    assert run(work, "clean12", *steps) == 0
    killed: list[int] = []
    first = work / "killed12" / "checkpoints" / "train" / "checkpoint_00000003"
    killer = threading.Thread(target=_kill_worker_after, args=(first, killed))
    killer.start()
    assert run(work, "killed12", *steps, "max_failures=2") == 0
    killer.join()
    assert killed, "no worker was killed"
    assert_same_adapter(adapter(work, "killed12"), adapter(work, "clean12"))


def test_rerun_after_the_job_is_killed_resumes_from_the_last_checkpoint(work, capsys):
    steps = ["max_steps=12", "checkpoint_every=3"]
    args = [f"pool={work / 'pool'}", f"output={work / 'jobkill'}", *BASE, *steps,
            f"mlflow_uri=sqlite:///{work / 'mlflow.db'}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *args], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = work / "jobkill" / "checkpoints" / "train"
    registered = ckpts / "checkpoint_manager_snapshot.json"  # written once a checkpoint is whole
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and not registered.exists():
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (ckpts / "checkpoint_00000003").exists() and not (work / "jobkill" / "adapter").exists()
    # A resume with another config is refused...
    assert train_job.main([*args, "beta=5000"]) == 2
    assert "was written with another config" in capsys.readouterr().err
    # ...the same config resumes and ends where an uninterrupted run does.
    if not (work / "clean12").exists():
        assert run(work, "clean12", *steps) == 0
    assert train_job.main(args) == 0
    assert "train: resuming from checkpoint_" in capsys.readouterr().out
    assert_same_adapter(adapter(work, "jobkill"), adapter(work, "clean12"))


def test_objectives_dpo_and_sft_train(work):
    assert run(work, "dpo", "max_steps=2", "objective=dpo") == 0
    assert run(work, "sft", "max_steps=2", "objective=sft") == 0
    assert adapter(work, "dpo").keys() == adapter(work, "sft").keys()


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_checkpoint(work, capsys):
    """A pool row whose latents are NaN (a corrupt sample) poisons the loss at the step that draws it."""
    import numpy as np

    from hgdpo import pool
    from hgdpo.pairs import PairPlan

    plan = PairPlan(pool_size=4, loser_rank=4, dataset_size=8, data_shards=2, global_batch=4, seed=0)
    first = {int(i) for v in range(2) for i in plan.step_indices(0, v)}
    second = {int(i) for v in range(2) for i in plan.step_indices(1, v)}
    target = min(second - first)  # drawn at step 2, not at step 1
    bad = work / "nan-pool"
    bad.mkdir()
    shutil.copy(work / "pool" / "pool.json", bad)
    table = pool.read(str(work / "pool"))
    rows = table.drop_columns(["latents"]).to_pydict()
    rows["latents"] = pool.latents_of(table).copy()
    rows["latents"][target] = np.nan
    part = pool.write_part(str(bad), pool.to_table(rows, rows["latents"].shape[1:]))
    pool.mark_complete(str(bad), [part], table.num_rows)

    args = [f"pool={bad}", f"output={work / 'nan'}", *BASE, "max_steps=6", "checkpoint_every=1"]
    assert train_job.main(args) == 2
    err = capsys.readouterr().err
    assert "became NaN/infinite at step 2" in err and "the last good checkpoint is" in err, err
    assert not (work / "nan" / "adapter").exists()
    kept = sorted(p.name for p in (work / "nan" / "checkpoints" / "train").glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000001"]


@pytest.mark.parametrize("case, message", [
    ("missing_pool", "is not a pool (no pool.json)"),
    ("not_a_pool", "is not empty and holds no pool"),
    ("incomplete_pool", "is incomplete"),
    ("other_base_model", "was written with base model 'embedded'"),
    ("pool_size", "train.pool_size: 5 is larger than the pool's N=4"),
    ("loser_rank", "train.loser_rank: must be between 2 and pool_size=4 (got 5)"),
    ("dataset_size", "train.dataset_size: 9 prompts asked, but the pool has 8"),
    ("micro_batch", "train.micro_batch: must divide"),
])
def test_bad_input_is_refused_before_work(work, tmp_path, capsys, case, message):
    pool_dir = work / "pool"
    extra: list[str] = []
    if case == "missing_pool":
        pool_dir = tmp_path / "nothing"
    elif case == "not_a_pool":
        pool_dir = tmp_path / "notes"
        pool_dir.mkdir()
        (pool_dir / "a.txt").write_text("x")
    elif case == "incomplete_pool":
        pool_dir = tmp_path / "partial"
        shutil.copytree(work / "pool", pool_dir)
        (pool_dir / "_COMPLETE.json").unlink()
    elif case == "other_base_model":
        from hgdpo import embedded

        other = tmp_path / "other-model"
        shutil.copytree(embedded.pipeline_dir(), other)
        config = other / "unet" / "config.json"
        config.write_text(config.read_text() + "\n")  # other bytes: another model as far as anyone can tell
        extra = [f"model={other}"]
    elif case == "pool_size":
        extra = ["pool_size=5"]
    elif case == "loser_rank":
        extra = ["loser_rank=5"]
    elif case == "dataset_size":
        extra = ["dataset_size=9"]
    elif case == "micro_batch":
        extra = ["micro_batch=3"]
    output = tmp_path / "out"
    assert train_job.main([f"pool={pool_dir}", f"output={output}", *BASE, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not output.exists()
