"""The trainer end to end on the embedded default: adapter, metrics, DDP equivalence, resume, bad input; the same
for objective focus, with its picture of the weights and its W = 1 case against dpo."""

from __future__ import annotations

import hashlib
import json
import math
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

from hgdpo.models.lora import ADAPTER_FILE, INFO_FILE
from hgdpo.train.trainer import CHECKPOINT_SNAPSHOT

REPO = Path(__file__).resolve().parents[2]
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
    # With hard negatives: the objectives that rank by PickScore read its originals, ospo its self-judged pairs.
    assert build_pool.main([f"prompts={tmp / 'prompts.txt'}", f"output={tmp / 'pool'}", "images_per_prompt=4",
                            "steps=4", "rows_per_file=4", "hard_negatives=[replace,swap,drop]", "--no-mlflow"]) == 0
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

    from hgdpo.models import embedded
    from hgdpo.models import loading as models

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


def plain_loop_adapter(work: Path, out: Path, *, round_hidden: bool, steps: int = 6) -> dict[str, torch.Tensor]:
    """The adapter of BASE + max_steps=``steps``, trained as the trainer did before pair datasets: one
    process, no Ray, the whole pipeline loaded, the pool's pairs chosen in memory, every micro-batch's
    prompts tokenised and run through the text encoder (float32; ``round_hidden``: rounded to float16,
    as the pair dataset stores them), clip, AdamW, LR schedule."""
    import numpy as np
    from diffusers import DDPMScheduler

    from hgdpo.models import loading as models
    from hgdpo.models.lora import add_lora, save_adapter
    from hgdpo.objectives.base import choose_pair
    from hgdpo.pool import store as pool
    from hgdpo.train import optim
    from hgdpo.train import step as train_step
    from hgdpo.train.config import TrainConfig
    from hgdpo.train.pairs import plan as make_plan

    cfg = TrainConfig(pool=str(work / "pool"), output=str(out), global_batch=4, micro_batch=2, data_shards=2,
                      learning_rate=1e-3, lora_rank=4, max_steps=steps)
    meta = pool.read_meta(cfg.pool)
    plan_ = make_plan(meta, pool_size=None, loser_rank=None, dataset_size=None, data_shards=2, global_batch=4, seed=0)
    table = pool.read(cfg.pool)
    latents = pool.latents_of(table)
    pairs = {}
    for row, i in enumerate(table.column("prompt_index").to_pylist()):
        w, l = choose_pair(np.asarray(table.column("scores")[row].as_py()), plan_.pool_size, plan_.loser_rank)
        held = table.column("latent_index")[row].as_py()
        pairs[i] = (table.column("prompt")[row].as_py(), latents[row, held.index(w)], latents[row, held.index(l)])
    pipe = models.load_pipeline("embedded")
    unet, tokenizer, text_encoder = pipe.unet, pipe.tokenizer, pipe.text_encoder.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    params = add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    optimizer = optim.make_optimizer(cfg, params, torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_factor(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (cpus_per_worker=1): the same float sums
    try:
        for step in range(steps):
            index = np.concatenate([plan_.step_indices(step, v) for v in range(plan_.data_shards)])
            for k in range(0, cfg.global_batch, cfg.micro_batch):
                ids = index[k: k + cfg.micro_batch]
                tokens = tokenizer([pairs[int(i)][0] for i in ids], padding="max_length", truncation=True,
                                   max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
                with torch.no_grad():
                    emb = text_encoder(tokens)[0]
                if round_hidden:
                    emb = emb.half().float()
                drawn = [train_step.pair_noise(cfg.seed, step, int(i), (4, 16, 16), cfg.timesteps(1000)) for i in ids]
                lat_w = torch.from_numpy(np.stack([pairs[int(i)][1] for i in ids])).float()
                lat_l = torch.from_numpy(np.stack([pairs[int(i)][2] for i in ids])).float()
                loss, _ = train_step.micro_step(cfg, unet, unet, noise_scheduler, emb, lat_w, lat_l,
                                             torch.cat([d[0] for d in drawn]), torch.stack([d[1] for d in drawn]),
                                             torch.autocast("cpu", enabled=False))
                (loss * (len(ids) / cfg.global_batch)).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    save_adapter(unet, out, cfg.lora_rank, cfg.lora_alpha, {})
    return load_file(str(out / ADAPTER_FILE))


def test_the_streamed_pairs_give_the_adapter_of_a_plain_loop(work, one_worker, tmp_path):
    # With the hidden states rounded as the pair dataset stores them: the same maths (bit-identical on the
    # machine this was written on; float rounding allowed).
    assert_same_adapter(one_worker, plain_loop_adapter(work, tmp_path / "rounded", round_hidden=True),
                        rtol=1e-5, atol=1e-7)
    # Against float32 hidden states (the trainer before pair datasets, which this loop reproduces bit for
    # bit): float16's rounding of the text encoder's output (relative 2^-11) changes the gradients in their
    # last digits, and Adam's first steps, which normalise each gradient element, turn that into up to
    # ~2e-4 on the adapter's smallest entries here (lr 1e-3, 6 steps; entries up to ~1).
    assert_same_adapter(one_worker, plain_loop_adapter(work, tmp_path / "float32", round_hidden=False),
                        rtol=1e-3, atol=5e-4)


def test_the_pair_dataset_is_written_once_beside_the_outputs_and_reused(work, one_worker, capsys):
    def datasets(**selection) -> list[Path]:
        found = []
        for folder in sorted(work.glob("pairs-*")):
            manifest = json.loads((folder / "pairs.json").read_text())
            if manifest["selection"] == selection and manifest["pool"] == str(work / "pool"):
                found.append(folder)
        return found

    (default,) = datasets(pool_size=4, loser_rank=4, dataset_size=8)
    stamps = {p.name: p.stat().st_mtime_ns for p in default.iterdir()}
    assert run(work, "reuse", "max_steps=2", "seed=3", "objective=dpo") == 0
    assert f"train: pairs: reusing {default}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in default.iterdir()} == stamps
    assert run(work, "other-selection", "max_steps=2", "pool_size=3", "loser_rank=2") == 0
    assert "train: pairs: selecting 8 pairs (n=3, loser rank 2)" in capsys.readouterr().out
    assert len(datasets(pool_size=3, loser_rank=2, dataset_size=8)) == 1
    assert datasets(pool_size=4, loser_rank=4, dataset_size=8) == [default]


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
    """SIGKILL this test's Ray Train worker process once ``checkpoint`` exists (as a node failure would). Only
    a descendant of this process (the raylet that ``ray_local`` started runs the workers): never another Ray's."""
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:  # ended meanwhile
            continue
        if "ray::RayTrainWorker" in cmdline:
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
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


def test_kto_learns_from_every_image_above_and_below_its_prompts_median(work):
    """objective kto: each prompt's 4 images give 2 records (a desirable one above the median with an undesirable
    one below it); the loss starts at 1/2 (policy == reference: every image at the reference point)."""
    import numpy as np
    import pyarrow.parquet as pq

    from hgdpo.pool import store as pool

    assert run(work, "kto", "max_steps=2", "objective=kto") == 0
    info = json.loads((work / "kto" / "adapter" / INFO_FILE).read_text())
    assert info["plan"]["selection"] == "utility" and info["plan"]["dataset_size"] == 2 * len(PROMPTS)
    (pairs,) = [p for p in work.glob("pairs-*") if json.loads((p / "pairs.json").read_text())["selection"].get(
        "rule") == "utility"]
    index = pq.read_table(pairs / "index.parquet").to_pylist()
    scores = {r["prompt_index"]: r["scores"] for r in pool.read(work / "pool", columns=["prompt_index", "scores"])
              .to_pylist()}
    for prompt in range(len(PROMPTS)):
        records = [r for r in index if r["prompt_index"] == prompt]
        median = float(np.median(scores[prompt]))
        assert len(records) == 2 and all(r["score_w"] > median > r["score_l"] for r in records)
        assert sorted(i for r in records for i in (r["winner"], r["loser"])) == [0, 1, 2, 3]  # all 4 images teach
    client, run_ = train_run(work, "kto")
    assert run_.data.tags["objective"] == "kto"
    losses = [m.value for m in client.get_metric_history(run_.info.run_id, "kto")]
    assert len(losses) == 2 and abs(losses[0] - 0.5) < 1e-4 and "stat" not in run_.data.metrics


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_checkpoint(work, capsys):
    """A pool row whose latents are NaN (a corrupt sample) poisons the loss at the step that draws it."""
    import numpy as np

    from hgdpo.pool import store as pool
    from hgdpo.pool.part_file import write_part
    from hgdpo.train.pairs import PairPlan

    plan = PairPlan(pool_size=4, loser_rank=4, dataset_size=8, data_shards=2, global_batch=4, seed=0)
    first = {int(i) for v in range(2) for i in plan.step_indices(0, v)}
    second = {int(i) for v in range(2) for i in plan.step_indices(1, v)}
    target = min(second - first)  # drawn at step 2, not at step 1
    bad = work / "nan-pool"
    bad.mkdir()
    shutil.copy(work / "pool" / "pool.json", bad)
    table = pool.read(str(work / "pool"))
    rows = pool.without_latents(table).to_pydict()
    rows["latents"] = pool.latents_of(table).copy()
    rows["latents"][target] = np.nan
    part = write_part(str(bad), pool.to_table(rows, rows["latents"].shape[1:]))
    pool.mark_complete(str(bad), [part], table.num_rows)

    args = [f"pool={bad}", f"output={work / 'nan'}", *BASE, "max_steps=6", "checkpoint_every=1"]
    assert train_job.main(args) == 2
    err = capsys.readouterr().err
    assert "became NaN/infinite at step 2" in err and "the last good checkpoint is" in err, err
    assert not (work / "nan" / "adapter").exists()
    kept = sorted(p.name for p in (work / "nan" / "checkpoints" / "train").glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000001"]


# The settings every adapter was stamped with before timestep_min/max (and kto) existed: such adapters must still match.
STAMPED_BEFORE_TIMESTEPS = (
    "pool", "model", "model_config", "objective", "pool_size", "loser_rank", "dataset_size", "beta",
    "lambda_stat", "lora_rank", "lora_alpha", "learning_rate", "lr_schedule", "warmup_steps", "max_steps",
    "global_batch", "data_shards", "max_grad_norm", "weight_decay", "optimizer", "seed", "mixed_precision",
    "stat_step", "stat_sampler_steps", "focus_alpha_d", "focus_alpha_c", "focus_gamma_c", "focus_t_lo", "focus_t_hi",
    "ospo_alpha", "ospo_gamma", "ospo_margin", "ospo_mask_resolutions",
)


def test_training_timesteps_are_drawn_from_the_configured_range():
    from hgdpo.train import step as train_step
    from hgdpo.train import trainer
    from hgdpo.train.config import TrainConfig

    cfg = TrainConfig(pool="p", output="o", timestep_min=600)
    assert cfg.timesteps(1000) == (600, 1000)
    drawn = [train_step.pair_noise(0, step, i, (4, 2, 2), cfg.timesteps(1000)) for step in range(20) for i in range(10)]
    ts = torch.cat([t for t, _ in drawn])
    assert int(ts.min()) >= 600 and int(ts.max()) < 1000 and len(set(ts.tolist())) > 100
    # The default range draws what the trainer always drew (adapters trained before the setting reproduce).
    t, noise = train_step.pair_noise(3, 7, 11, (4, 2, 2), TrainConfig(pool="p", output="o").timesteps(1000))
    digest = hashlib.sha256(b"3:7:11").digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    assert torch.equal(t, torch.randint(0, 1000, (1,), generator=gen)) and torch.equal(noise, torch.randn((4, 2, 2), generator=gen))
    # ... and adapters trained before the setting existed keep their fingerprint (they resume, reruns skip them).
    default, meta = TrainConfig(pool="p", output="o"), {"fingerprint": {"pool": "x"}}
    before = {k: getattr(default, k) for k in STAMPED_BEFORE_TIMESTEPS}
    before["lambda_stat"] = 10000.0  # the field's old default, which every adapter was stamped with unless set

    def stamp(settings):
        return hashlib.sha256(json.dumps(dict(settings, pool_fingerprint=meta["fingerprint"]), sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]

    assert trainer.fingerprint(default, meta) == stamp(before)
    assert trainer.fingerprint(TrainConfig(pool="p", output="o", timestep_min=500), meta) != \
        trainer.fingerprint(default, meta)
    # When only hgdpo took lambda_stat, another objective ignored it: its adapters match at the old default and at 0.
    dpo = dict(before, objective="dpo")
    assert set(trainer.fingerprints(TrainConfig(pool="p", output="o", objective="dpo"), meta)) == \
        {stamp(dict(dpo, lambda_stat=0.0)), stamp(dpo)}
    assert stamp(dict(dpo, lambda_stat=0)) in trainer.fingerprints(
        TrainConfig(pool="p", output="o", objective="dpo", lambda_stat=0), meta)  # lambda_stat: 0, as sweeps set it
    # ... but dpo with statistic matching now trains otherwise: no older adapter matches it.
    regularised = trainer.fingerprints(TrainConfig(pool="p", output="o", objective="dpo", lambda_stat=10000.0), meta)
    assert len(regularised) == 1 and stamp(dpo) not in regularised


@pytest.mark.parametrize("objective", ["hgdpo", "dpo", "sft"])
def test_a_v_prediction_model_is_refused_for_every_objective(work, tmp_path, capsys, objective):
    from hgdpo.models import embedded

    model = tmp_path / "v-model"
    shutil.copytree(embedded.pipeline_dir(), model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"epsilon"', '"v_prediction"'))
    output = tmp_path / "out"
    assert train_job.main([f"pool={work / 'pool'}", f"output={output}", *BASE, f"model={model}",
                           f"objective={objective}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: train.model: '{model}' is a v_prediction model (prediction_type in its "
                          f"scheduler config); training supports epsilon-prediction models only"), err
    assert not output.exists()


@pytest.mark.parametrize("case, message", [
    ("missing_pool", "is not a pool (no pool.json)"),
    ("not_a_pool", "is not empty and holds no pool"),
    ("incomplete_pool", "is incomplete"),
    ("other_base_model", "was written with base model 'embedded'"),
    ("pool_size", "train.pool_size: 5 is larger than the pool's N=4"),
    ("loser_rank", "train.loser_rank: must be between 2 and pool_size=4 (got 5)"),
    ("dataset_size", "train.dataset_size: 9 prompts asked, but the pool has 8"),
    ("micro_batch", "train.micro_batch: must divide"),
    ("ospo_plain_pool", "train.objective: ospo trains on a pool with hard negatives"),
    ("ospo_mask_resolutions", "train.ospo_mask_resolutions[0]: the UNet of 'embedded' has no cross-attention layers "
                              "at resolution 16; it has 8"),
    ("timestep_max", "train.timestep_max: the model's scheduler has 1000 timesteps (got 1200)"),
    ("timestep_order", "train.timestep_max: must be above timestep_min=600 (got 500)"),
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
        from hgdpo.models import embedded

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
    elif case == "ospo_plain_pool":  # the same pool as if built without hard negatives
        pool_dir = tmp_path / "plain"
        shutil.copytree(work / "pool", pool_dir)
        meta = json.loads((pool_dir / "pool.json").read_text())
        meta["config"]["hard_negatives"] = []
        (pool_dir / "pool.json").write_text(json.dumps(meta))
        extra = ["objective=ospo"]
    elif case == "ospo_mask_resolutions":
        extra = ["objective=ospo", "ospo_mask_resolutions=[16]"]
    elif case == "timestep_max":
        extra = ["timestep_max=1200"]
    elif case == "timestep_order":
        extra = ["timestep_min=600", "timestep_max=500"]
    output = tmp_path / "out"
    assert train_job.main([f"pool={pool_dir}", f"output={output}", *BASE, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not output.exists()


# --- objective focus (hgdpo.objectives.focus): the region-weighted Diffusion-DPO through the same job ------------

# With the ablations (n=3 of N=4, the 2nd best as loser, 6 of the 8 prompts), so every focus run checks them.
FOCUS = ["objective=focus", "pool_size=3", "loser_rank=2", "dataset_size=6", "max_steps=6", "checkpoint_every=3"]


@pytest.fixture(scope="module")
def focus_one_worker(work):
    assert run(work, "focus-w1", *FOCUS) == 0
    return adapter(work, "focus-w1")


def train_run(work: Path, name: str):
    """The MLflow client of the module's store and the training run that wrote ``<work>/<name>``."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hgdpo-train")
    (found,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("output") == str(work / name)]
    return client, found


def assert_trained(weights: dict[str, torch.Tensor]) -> None:
    """Finite, and moved from the initial adapter (LoRA's up/B matrices start at zero)."""
    assert all(torch.isfinite(v).all() for v in weights.values())
    up = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert up and all(v.abs().max() > 0 for v in up)


def focus_picture(client, run_id: str, tmp_path: Path):
    import numpy as np
    from PIL import Image

    path = client.download_artifacts(run_id, "focus/weights.png", str(tmp_path))
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L"))


def picture_cell(picture, row: int, column: int):
    """Cell (row, column) of ``pictures.weight_grid``: an 80 px caption column, 16 px of column labels, cells of
    16 x 6 = 96 px (16x16 latents enlarged by the smallest whole factor reaching 96) 4 px apart."""
    top, left = 16 + 4 + row * (96 + 4), 80 + 4 + column * (96 + 4)
    return picture[top:top + 96, left:left + 96]


def test_focus_trains_and_records_its_run_as_the_other_objectives(work, focus_one_worker):
    assert_trained(focus_one_worker)
    info = json.loads((work / "focus-w1" / "adapter" / INFO_FILE).read_text())
    assert info["config"]["objective"] == "focus" and info["config"]["focus_alpha_d"] == 1.0
    assert {k: info["plan"][k] for k in ("pool_size", "loser_rank", "dataset_size")} == {
        "pool_size": 3, "loser_rank": 2, "dataset_size": 6}
    client, run_ = train_run(work, "focus-w1")
    assert run_.data.tags["objective"] == "focus" and run_.data.params["focus_gamma_c"] == "1.0"
    for name in ("loss", "dpo", "accuracy", "reward_margin", "policy_err_w", "policy_err_l", "ref_err_w",
                 "ref_err_l", "grad_norm", "lr", "pairs_per_s"):
        history = client.get_metric_history(run_.info.run_id, name)
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6], name
        assert all(math.isfinite(m.value) for m in history), name
    assert client.get_metric_history(run_.info.run_id, "stat") == []  # no statistic matching
    losses = [m.value for m in client.get_metric_history(run_.info.run_id, "dpo")]
    assert abs(losses[0] - math.log(2)) < 1e-4  # step 1: policy == reference on the same weighted errors
    assert f"adapter/{ADAPTER_FILE}" in {a.path for a in client.list_artifacts(run_.info.run_id, "adapter")}


def test_focus_logs_a_picture_of_its_weights_at_the_first_step(work, focus_one_worker, tmp_path):
    import numpy as np

    client, run_ = train_run(work, "focus-w1")
    assert [a.path for a in client.list_artifacts(run_.info.run_id, "focus")] == ["focus/weights.png"]
    picture = focus_picture(client, run_.info.run_id, tmp_path)
    # 4 pairs (the worker's whole first batch) x (winner, loser, W at t = 100, 500, 900).
    assert picture.shape == (16 + 4 * (96 + 4) + 4, 80 + 5 * (96 + 4) + 4)
    for row in range(4):
        cells = [picture_cell(picture, row, column) for column in range(5)]
        for cell in cells:  # nearest-neighbour: each latent pixel a 6x6 block of one value
            assert np.array_equal(cell, np.repeat(np.repeat(cell[::6, ::6], 6, axis=0), 6, axis=1))
        for cell in cells[:2]:  # the latents' channel mean, min-max normalised
            assert cell.min() == 0 and cell.max() == 255
        for cell in cells[2:]:
            assert len(np.unique(cell)) > 1  # W is not one value over the latent
        assert not np.array_equal(cells[2], cells[4])  # ...and changes with t (complexity on at 100, off at 900)


def test_focus_with_every_term_off_gives_the_adapter_of_plain_dpo(work, tmp_path):
    # W = 1: weighted_per_sample_error's sum(1 * e) / sum(1) is per_sample_error's mean, float for float.
    assert run(work, "dpo-lambda0", "max_steps=2", "objective=dpo", "lambda_stat=0") == 0
    assert run(work, "focus-off", "max_steps=2", "objective=focus", "focus_alpha_d=0", "focus_alpha_c=0",
               "focus_gamma_c=0") == 0
    assert_trained(adapter(work, "focus-off"))
    assert_same_adapter(adapter(work, "focus-off"), adapter(work, "dpo-lambda0"))
    client, dpo_run = train_run(work, "dpo-lambda0")
    assert client.list_artifacts(dpo_run.info.run_id, "focus") == []  # no picture for another objective
    _, off_run = train_run(work, "focus-off")
    picture = focus_picture(client, off_run.info.run_id, tmp_path)
    assert all((picture_cell(picture, row, column) == 128).all() for row in range(4) for column in (2, 3, 4))


def test_focus_two_workers_give_the_adapter_of_one(work, focus_one_worker, tmp_path):
    assert run(work, "focus-w2", *FOCUS, "workers=2") == 0
    assert_same_adapter(adapter(work, "focus-w2"), focus_one_worker, rtol=1e-4, atol=1e-6)
    client, run_ = train_run(work, "focus-w2")
    assert focus_picture(client, run_.info.run_id, tmp_path).shape[0] == 16 + 2 * (96 + 4) + 4  # rank 0's 2 pairs


def test_focus_a_worker_that_dies_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(work, focus_one_worker):
    killed: list[int] = []
    registered = work / "focus-killed" / "checkpoints" / "train" / CHECKPOINT_SNAPSHOT  # step 3's, once whole
    killer = threading.Thread(target=_kill_worker_after, args=(registered, killed))
    killer.start()
    assert run(work, "focus-killed", *FOCUS, "max_failures=2") == 0
    killer.join()
    assert killed, "no worker was killed"
    assert_same_adapter(adapter(work, "focus-killed"), focus_one_worker)
    client, run_ = train_run(work, "focus-killed")
    steps = [m.step for m in client.get_metric_history(run_.info.run_id, "loss")]
    assert set(steps) == {1, 2, 3, 4, 5, 6} and [steps.count(s) for s in (1, 2, 3)] == [1, 1, 1]  # not redone


# --- objective ospo (hgdpo.pool.ospo): the self-judged pairs of the pool's hard negatives, mask-weighted ----------

OSPO = ["objective=ospo", "pool_size=3", "max_steps=4", "checkpoint_every=2"]


@pytest.fixture(scope="module")
def ospo_one_worker(work):
    assert run(work, "ospo-w1", *OSPO) == 0
    return adapter(work, "ospo-w1")


def test_ospo_trains_on_the_pairs_the_self_judge_kept_under_the_original_prompt(work, ospo_one_worker):
    import numpy as np
    import pyarrow.parquet as pq

    from hgdpo.pool import ospo
    from hgdpo.pool import store as pool

    assert_trained(ospo_one_worker)
    info = json.loads((work / "ospo-w1" / "adapter" / INFO_FILE).read_text())
    # The pairs: for each of the 8 prompts, the rule applied to the pool's self-scores among the first 3 seeds.
    table = pool.read(work / "pool", columns=["prompt_index", "prompt", "self_scores", "self_least"]).to_pylist()
    expected = {r["prompt_index"]: ospo.choose_pair(r["self_scores"], r["self_least"], 3, 0.0) for r in table}
    kept = sorted(i for i, j in expected.items() if j is not None)
    assert 4 <= len(kept) < 8  # enough for a global batch of 4, and the self-judge refused some
    assert info["plan"]["dataset_size"] == len(kept) and info["plan"]["selection"] == "ospo"
    (pairs,) = [p for p in work.glob("pairs-*") if json.loads((p / "pairs.json").read_text())["selection"].get(
        "rule") == "ospo"]
    index = pq.read_table(pairs / "index.parquet").to_pylist()
    assert [r["index"] for r in index] == list(range(len(kept))) and [r["prompt_index"] for r in index] == kept
    assert all(r["winner"] == expected[r["prompt_index"]] and r["loser"] == 4 + r["winner"] for r in index)
    # Each record: the original's and its negative's latents (same seed), the *original* prompt's hidden states,
    # and its nouns.
    from hgdpo.train.pair_records import PairReader

    manifest = json.loads((pairs / "pairs.json").read_text())
    batch = PairReader(str(pairs), manifest, owned=lambda i: np.ones(len(i), bool)).read([0])
    latents = pool.latents_of(pool.read(work / "pool"))[kept[0]]
    np.testing.assert_array_equal(batch.latents_w[0], latents[index[0]["winner"]])
    np.testing.assert_array_equal(batch.latents_l[0], latents[index[0]["loser"]])
    assert ospo.decode_nouns(batch.nouns[0]) == ospo.noun_tokens(_tokenizer(), index[0]["prompt"])
    client, run_ = train_run(work, "ospo-w1")
    assert run_.data.tags["objective"] == "ospo" and run_.data.tags["ospo_pairs"] == str(len(kept))
    losses = [m.value for m in client.get_metric_history(run_.info.run_id, "dpo")]
    assert len(losses) == 4 and abs(losses[0] - math.log(2)) < 1e-4  # step 1: policy == reference


def _tokenizer():
    from hgdpo.models import loading as models

    return models.load_tokenizer("embedded")


def test_ospo_logs_a_picture_of_the_winners_and_losers_mask_weights(work, ospo_one_worker, tmp_path):
    import numpy as np
    from PIL import Image

    client, run_ = train_run(work, "ospo-w1")
    path = client.download_artifacts(run_.info.run_id, "ospo/masks.png", str(tmp_path))
    picture = np.asarray(Image.open(path).convert("L"))
    # The worker's 4 pairs x (winner, loser, then W of the winner and of the loser at t = 100, 500, 900).
    assert picture.shape == (16 + 4 * (96 + 4) + 4, 80 + 8 * (96 + 4) + 4)
    for row in range(4):
        weights = [picture_cell(picture, row, column) for column in range(2, 8)]
        assert all(len(np.unique(cell)) > 1 for cell in weights)  # an object mask, not a constant


def test_ospo_two_workers_give_the_adapter_of_one(work, ospo_one_worker):
    assert run(work, "ospo-w2", *OSPO, "workers=2") == 0
    assert_same_adapter(adapter(work, "ospo-w2"), ospo_one_worker, rtol=1e-4, atol=1e-6)
