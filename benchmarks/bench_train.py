"""Benchmark of the HG-DPO trainer: one step against plain DPO and a straightforward step, and the job's pairs/s.

One run measures, on the embedded default model (SD1.5 architecture, 64x64 images, latents
4x16x16), on CPU, with ``--threads`` torch threads (default 2), the same pairs of a small pool
built once with ``jobs/build_pool.py``:

* **(a) steps: hgdpo vs dpo** -- one optimizer step on a micro-batch of ``--pairs`` pairs:
  ``hgdpo.train.step.micro_step`` (objective ``hgdpo``: eq. 3 + eq. 8 from the same predictions),
  backward, gradient clipping, AdamW, LR schedule -- against the same with objective ``dpo``.
  Same pairs, timesteps and noise (``hgdpo.train.step.pair_noise``) in both; wall time per step.
* **(b) steps: ours vs naive** -- our hgdpo step against a straightforward implementation written
  here (``NaiveStep``): a second, frozen deep copy of the UNet as the reference; the pool holds
  images (the latents decoded once, beforehand, to uint8 pixels) that the VAE encoder turns into
  latents every step (one VAE call for winners and losers, ``latent_dist.sample()`` as in
  diffusers' Diffusion-DPO example); winner and loser through the UNets separately (4 UNet calls
  of m instead of 2 of 2m). Same losses (``hgdpo.objectives.losses``). Wall time per step, and peak memory:
  each variant in a fresh process (see ``memory_child``).
* **(c) the job** -- ``jobs/train.py``'s ``main()`` on the pool with workers=1 (cpus_per_worker 1
  and 2) and workers=2 (cpus_per_worker 1: two cores, one each), the same global batch,
  micro-batch and data shards. pairs/s is read from the job's own MLflow metric ``pairs_per_s``
  (rank 0, every ``metrics_every`` steps), leaving out the first report (warm-up); also the wall
  time of ``main()`` and how it splits (to the first report, training, after the last).

* **(d) scale** -- the job's peak memory (driver, each worker, the object store) against the pool's
  size, on synthetic pools at SD1.5's 704x1024 latent shape (``train_scale.py``).

Steps of (a)/(b) are interleaved (per repeat every variant once, the order reversed every other
repeat); the table shows medians and ratios of medians, and the median of the per-repeat ratios.
Job runs are interleaved the same way. Others' CPU use on the machine is recorded per phase.

    .venv/bin/python benchmarks/bench_train.py                       # ~6-8 minutes on 2 cores
    .venv/bin/python benchmarks/bench_train.py --parts steps,memory --repeats 20 --out /tmp/t.json
    .venv/bin/python benchmarks/bench_train.py --workdir /tmp/bt     # keeps (and reuses) the pool
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# This file runs as a script: its own folder goes on the path for the shared helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_scale
from measure import (
    MIB,
    LoadMonitor,
    machine,
    median,
    peak_memory,
    ratio,
    save,
    timed_method,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(tempfile.gettempdir()) / "hgdpo-bench-train.json"


# ---------------------------------------------------------------------------------------------
# Inputs: the pool (built once), the pairs, their pixels


def build_pool(args, work: Path) -> tuple[Path, float | None]:
    """Build the pool with the real job (``jobs/build_pool.py``, its own process and Ray)."""
    from hgdpo.world.prompts import make_prompts

    out = work / "pool"
    if (out / "_COMPLETE.json").is_file():
        return out, None
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(make_prompts(args.pool_prompts)) + "\n")
    cmd = [sys.executable, str(ROOT / "jobs" / "build_pool.py"), f"prompts={prompts}", f"output={out}",
           f"images_per_prompt={args.pool_images}", f"steps={args.pool_steps}",
           f"mlflow_uri=sqlite:///{work / 'pool-mlflow.db'}", "--no-mlflow"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"building the pool failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out, time.perf_counter() - start


def load_pairs(pool_dir: Path, m: int) -> dict:
    """The first ``m`` pairs of the pool, chosen as the trainer chooses them (defaults: best vs worst)."""
    import numpy as np
    import torch

    from hgdpo.objectives.base import choose_pair
    from hgdpo.pool import store as pool

    meta = pool.read_meta(str(pool_dir))
    n = int(meta["images_per_prompt"])
    table = pool.read(str(pool_dir), columns=["prompt_index", "prompt", "scores", "latent_index", "latents"])
    if len(table) < m:
        sys.exit(f"--pairs {m}: the pool has only {len(table)} prompts")
    table = table.slice(0, m)
    latents = pool.latents_of(table)  # (m, K, C, h, w) float16
    lw, ll = [], []
    for b, (s, li) in enumerate(zip(table.column("scores").to_pylist(), table.column("latent_index").to_pylist())):
        w, l = choose_pair(np.asarray(s), n, n)
        lw.append(latents[b, li.index(w)]), ll.append(latents[b, li.index(l)])
    return {"index": table.column("prompt_index").to_pylist(), "prompts": table.column("prompt").to_pylist(),
            "lat_w": torch.from_numpy(np.stack(lw)).float(), "lat_l": torch.from_numpy(np.stack(ll)).float()}


def to_pixels(vae, latents):
    """Decode latents once to uint8 images (m, 3, H, W): what a pool of images would hold."""
    import torch

    with torch.no_grad():
        x = vae.decode(latents / vae.config.scaling_factor).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_batch(inputs: dict, seed: int, step: int, noise_scheduler) -> dict:
    """The step's inputs: pairs plus the trainer's own timestep and noise draw per pair."""
    import torch

    from hgdpo.train.step import pair_noise

    shape = tuple(inputs["lat_w"].shape[1:])
    drawn = [pair_noise(seed, step, int(i), shape, (0, noise_scheduler.config.num_train_timesteps))
             for i in inputs["index"]]
    return dict(inputs, t=torch.cat([d[0] for d in drawn]), noise=torch.stack([d[1] for d in drawn]), step=step)


# ---------------------------------------------------------------------------------------------
# The steps


class Timings:
    """Seconds per part of a step, filled by forward hooks and the step itself (when enabled)."""

    def __init__(self):
        self.on = False
        self.spent: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}

    def add(self, name: str, seconds: float) -> None:
        if self.on:
            self.spent[name] += seconds

    def hook(self, module, name_of) -> None:
        def pre(mod, args, kwargs=None):
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            self.add(name_of(), time.perf_counter() - self._start.pop(id(mod)))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


class TimedTokenizer:
    """The tokenizer, timed: the naive step tokenises at every step; ours encodes a batch's prompts once, as
    the trainer's pair dataset holds their hidden states."""

    def __init__(self, tokenizer, timings: Timings):
        self._tok, self._timings = tokenizer, timings

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self._tok(*a, **kw)
        finally:
            self._timings.add("tokenizer", time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def unet_part(reference: bool | None = None):
    import torch

    def name():
        ref = (not torch.is_grad_enabled()) if reference is None else reference
        return "unet reference (no grad)" if ref else "unet policy"
    return name


class Step:
    """One optimizer step of the trainer: ``micro_step``, backward, clipping, AdamW, LR schedule."""

    naive = False

    def __init__(self, name: str, objective: str, pipe, unet, noise_scheduler, args):
        import torch

        from hgdpo.models.lora import add_lora
        from hgdpo.train import optim
        from hgdpo.train.config import TrainConfig

        self.name, self.pipe, self.unet, self.ns = name, pipe, unet, noise_scheduler
        self.cfg = TrainConfig(pool="-", output="-", objective=objective, lora_rank=args.lora_rank,
                               learning_rate=args.learning_rate, seed=args.seed, max_steps=10**6)
        self.params = add_lora(unet, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.seed)
        self.opt = optim.make_optimizer(self.cfg, self.params, torch.device("cpu"))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, optim.lr_factor(self.cfg))
        self.autocast = optim.precision(self.cfg, torch.device("cpu")).autocast()
        self.timings = Timings()
        self.timings.hook(unet, unet_part())
        self.timings.hook(pipe.text_encoder, lambda: "text encoder")
        self.tok = TimedTokenizer(pipe.tokenizer, self.timings)
        if not self.naive:  # the reference pass toggles the adapters of every LoRA layer off and on
            for method in ("disable_adapters", "enable_adapters"):
                timed_method(unet, method, self.timings.add, "adapters off/on")

    def lora_b(self):
        return [p for n, p in self.unet.named_parameters() if p.requires_grad and "lora_B" in n]

    def loss(self, b, from_pixels: bool = True):
        from hgdpo.train import pair_data
        from hgdpo.train import step as train_step

        if "emb" not in b:  # the trainer's pairs carry the prompts' hidden states, encoded once
            b["emb"] = pair_data.encode_prompts(self.tok, self.pipe.text_encoder, b["prompts"])
        return train_step.micro_step(self.cfg, self.unet, self.unet, self.ns, b["emb"], b["lat_w"], b["lat_l"], b["t"],
                                  b["noise"], self.autocast)[0]

    def __call__(self, b) -> float:
        import torch

        loss = self.loss(b)
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        t2 = time.perf_counter()
        self.timings.add("backward", t1 - t0)
        self.timings.add("clip + AdamW", t2 - t1)
        return float(loss.detach())


class NaiveStep(Step):
    """The straightforward step: a frozen copy of the UNet, images encoded every step, 4 UNet calls."""

    naive = True

    def __init__(self, name: str, objective: str, pipe, unet, noise_scheduler, args):
        # The reference: a second, frozen copy of the base UNet (taken before the LoRA is added).
        self.ref = copy.deepcopy(unet).requires_grad_(False).eval()
        super().__init__(name, objective, pipe, unet, noise_scheduler, args)
        self.timings.hook(self.ref, unet_part(reference=True))

    def loss(self, b, from_pixels: bool = True):
        import torch

        from hgdpo.objectives import losses, stat_matching

        ids = self.tok(list(b["prompts"]), padding="max_length", max_length=self.tok.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            emb = self.pipe.text_encoder(ids)[0]
        if from_pixels:
            t0 = time.perf_counter()
            vae = self.pipe.vae
            with torch.no_grad():
                px = torch.cat([b["px_w"], b["px_l"]]).float() / 127.5 - 1.0
                gen = torch.Generator().manual_seed(int(b["step"]))
                lat = vae.encode(px).latent_dist.sample(generator=gen) * vae.config.scaling_factor
            lat_w, lat_l = lat.chunk(2)
            self.timings.add("vae encode", time.perf_counter() - t0)
        else:
            lat_w, lat_l = b["lat_w"], b["lat_l"]
        t, noise = b["t"], b["noise"]
        noisy_w, noisy_l = self.ns.add_noise(lat_w, noise, t), self.ns.add_noise(lat_l, noise, t)
        with torch.no_grad():
            ref_w = self.ref(noisy_w, t, encoder_hidden_states=emb).sample
            ref_l = self.ref(noisy_l, t, encoder_hidden_states=emb).sample
        pol_w = self.unet(noisy_w, t, encoder_hidden_states=emb).sample
        pol_l = self.unet(noisy_l, t, encoder_hidden_states=emb).sample
        loss, _ = losses.dpo_loss(losses.per_sample_error(noise, pol_w), losses.per_sample_error(noise, pol_l),
                                  losses.per_sample_error(noise, ref_w), losses.per_sample_error(noise, ref_l),
                                  beta=self.cfg.beta)
        if self.cfg.objective == "hgdpo":
            coef = stat_matching.ddpm_eps_coefficient(self.ns, t)
            loss = stat_matching.total_loss(loss, stat_matching.stat_matching_loss(pol_w, ref_w, coef), self.cfg.stat_weight())
        return loss


VARIANTS = {  # name: (class, objective)
    "ours_hgdpo": (Step, "hgdpo"),
    "ours_dpo": (Step, "dpo"),
    "naive_hgdpo": (NaiveStep, "hgdpo"),
}


def setup(args, inputs_file: Path):
    """Torch threads, the pipeline, the DDPM noise scheduler and the inputs (as the trainer has them)."""
    import torch
    from diffusers import DDPMScheduler

    from hgdpo.infra.quiet import quiet_libraries
    from hgdpo.models import loading as models

    quiet_libraries()
    torch.set_num_threads(args.threads)
    pipe = models.load_pipeline("embedded")
    pipe.text_encoder.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    inputs = torch.load(inputs_file, weights_only=True)
    return pipe, noise_scheduler, inputs


# ---------------------------------------------------------------------------------------------
# (a) + (b): step times, interleaved


def loss_check(steps: dict, b: dict) -> dict:
    """Same maths: from the same latents the naive step's loss and gradient are ours.

    LoRA's B starts at zero (policy == reference, every loss log 2), so every variant's B is first
    set to the same small random values. Up to float rounding (batched vs separate UNet calls);
    from the re-encoded pixels the loss differs (VAE round trip, posterior sample).
    """
    import torch

    gen = torch.Generator().manual_seed(1234)
    shapes = [p.shape for p in steps["ours_hgdpo"].lora_b()]
    values = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    for s in steps.values():
        with torch.no_grad():
            for p, v in zip(s.lora_b(), values):
                p.copy_(v)
    grads, out = {}, {}
    for name, kw in (("ours_hgdpo", {}), ("naive_hgdpo_from_latents", {"from_pixels": False}),
                     ("naive_hgdpo_from_pixels", {}), ("ours_dpo", {})):
        s = steps[name.split("_from")[0]]
        loss = s.loss(b, **kw)
        loss.backward()
        out[name] = float(loss.detach())
        grads[name] = torch.cat([p.grad.flatten() for p in s.params])
        s.opt.zero_grad(set_to_none=True)
    a, n = grads["ours_hgdpo"], grads["naive_hgdpo_from_latents"]
    out["loss_abs_diff_ours_vs_naive_from_latents"] = abs(out["ours_hgdpo"] - out["naive_hgdpo_from_latents"])
    out["grad_max_rel_diff_ours_vs_naive_from_latents"] = float((a - n).abs().max() / a.abs().max())
    return out


def run_steps(args, inputs_file: Path) -> dict:
    import torch

    pipe, ns, inputs = setup(args, inputs_file)
    base = copy.deepcopy(pipe.unet)  # every variant gets its own copy: the same initial weights and LoRA
    steps = {name: cls(name, obj, pipe, copy.deepcopy(base), ns, args) for name, (cls, obj) in VARIANTS.items()}
    batches = [make_batch(inputs, args.seed, k, ns) for k in range(args.warmup + args.repeats + args.breakdown_steps)]

    check = loss_check(steps, batches[0])

    names = list(steps)
    for k in range(args.warmup):  # first calls: oneDNN primitives, optimizer state
        for name in names:
            steps[name](batches[k])
    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    with LoadMonitor() as mon:
        for rep in range(args.repeats):
            b = batches[args.warmup + rep]
            for name in (names if rep % 2 == 0 else names[::-1]):
                c0, t0 = time.process_time(), time.perf_counter()
                steps[name](b)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    # Where the time goes: a few more steps per variant with the timers on (hooks cost ~nothing).
    parts: dict[str, dict] = {}
    for name in names:
        s = steps[name]
        s.timings.on, s.timings.spent = True, defaultdict(float)
        t0 = time.perf_counter()
        for k in range(args.breakdown_steps):
            s(batches[args.warmup + args.repeats + k])
        total = (time.perf_counter() - t0) / args.breakdown_steps
        s.timings.on = False
        split = {k: v / args.breakdown_steps for k, v in s.timings.spent.items()}
        split["other (noising, cat, losses, coefficients)"] = total - sum(split.values())
        parts[name] = {"step_s": total, "parts_s": split}
    return {"wall_s": dict(wall), "cpu_s": dict(cpu), "loss_check": check, "parts": parts,
            "foreign_cpu_share": mon.foreign_share, "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# (b): peak memory, one fresh process per variant


def tensor_peak(fn) -> dict:
    """Peak bytes of tensors live during ``fn()``, from torch's profiler (allocator events, by category)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())  # times, bytes per category
    try:
        from torch.profiler._memory_profiler import _CATEGORY_TO_COLORS

        labels = ["-"] + [c.name.lower() if c is not None else "unknown" for c in _CATEGORY_TO_COLORS]
    except ImportError:
        labels = [f"column{i}" for i in range(len(sizes[0]))]
    totals = [sum(row) for row in sizes]
    k = max(range(len(totals)), key=totals.__getitem__)
    return {"peak_bytes": totals[k], "at_start_bytes": totals[0],
            "at_peak_by_category": {labels[i]: v for i, v in enumerate(sizes[k]) if v}}


def memory_child(args, variant: str, inputs_file: Path) -> dict:
    """Peak memory of one variant's steps in this (fresh) process. See benchmarks/README.md for what it means."""
    import torch

    pipe, ns, inputs = setup(args, inputs_file)
    batches = [make_batch(inputs, args.seed, k, ns) for k in range(args.memory_steps + 2)]
    cls, objective = VARIANTS[variant]

    def setup_and_first_step():
        # The trainer's way: LoRA on the pipeline's UNet (the naive variant copies it first as its reference).
        step = cls(variant, objective, pipe, pipe.unet, ns, args)
        step(batches[0])  # the first step: optimizer state, oneDNN primitives
        return step

    # Over the RSS after imports, pipeline loading and inputs: what every variant has.
    first = peak_memory(setup_and_first_step)
    step = first["result"]
    if first["peak"] is None:  # ru_maxrss since process start: includes loading, so only an upper bound
        import resource

        first["growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - first["rss_before"]
    steady = peak_memory(lambda: [step(b) for b in batches[1:1 + args.memory_steps]])
    prof = tensor_peak(lambda: step(batches[-1]))
    ref = getattr(step, "ref", None)
    return {"variant": variant, "peak_reset": first["peak"] is not None,
            "reference_copy_bytes": sum(p.numel() * p.element_size() for p in ref.parameters()) if ref else 0,
            "rss_after_load": first["rss_before"], "first_step_peak_over_load": first["growth"],
            "rss_before_steps": steady["rss_before"], "steady_step_peak_over_rss": steady["growth"],
            "tensors": prof, "torch_threads": torch.get_num_threads()}


def run_memory(args, argv_child: list[str], inputs_file: Path) -> dict:
    env = dict(os.environ)
    # A fixed mmap threshold (64 KiB) turns off glibc's dynamic one: big buffers are mmap'ed and
    # returned to the system when freed, so RSS follows live memory instead of glibc's free lists.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    runs: dict[str, list[dict]] = defaultdict(list)
    names = [v for v in args.memory_variants.split(",") if v]
    for rep in range(args.memory_repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            cmd = [sys.executable, __file__, *argv_child, f"--child-memory={name}", f"--child-inputs={inputs_file}"]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"memory child {name} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append(r)
            print(f"  memory {name:<12} first step +{r['first_step_peak_over_load'] / MIB:6.1f} MiB over load, "
                  f"steady step +{(r['steady_step_peak_over_rss'] or 0) / MIB:6.1f} MiB over RSS, "
                  f"tensors peak {r['tensors']['peak_bytes'] / MIB:6.1f} MiB", flush=True)
    return dict(runs)


# ---------------------------------------------------------------------------------------------
# (c): the job


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_jobs_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(args, train_main, pool_dir: Path, work: Path, name: str, workers: int, cpus: float, rep: int,
            mlflow_uri: str) -> dict:
    import mlflow

    output = (work / f"train-{name}-{rep}").resolve()
    argv = [f"pool={pool_dir}", f"output={output}", "objective=hgdpo", f"max_steps={args.job_steps}",
            f"global_batch={args.job_global_batch}", f"micro_batch={args.job_micro_batch}",
            f"data_shards={args.job_data_shards}", f"workers={workers}", f"cpus_per_worker={cpus}",
            f"metrics_every={args.metrics_every}", f"checkpoint_every={args.job_steps}",
            f"learning_rate={args.learning_rate}", f"lora_rank={args.lora_rank}", f"seed={args.seed}",
            f"mlflow_uri={mlflow_uri}", "mlflow_experiment=bench-train"]
    with LoadMonitor() as mon:
        start = time.perf_counter()
        rc = train_main(argv)
        wall = time.perf_counter() - start
    if rc:
        sys.exit(f"jobs/train.py {' '.join(argv)} failed with {rc}")
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("bench-train")
    run = client.search_runs([exp.experiment_id], filter_string=f"tags.output = '{output}'")[0]
    hist = sorted(client.get_metric_history(run.info.run_id, "pairs_per_s"), key=lambda m: m.step)
    rates = [m.value for m in hist[1:]]
    rate = median(rates)
    span = (hist[-1].timestamp - hist[0].timestamp) / 1000 if len(hist) > 1 else None
    steady_steps = hist[-1].step - hist[0].step if len(hist) > 1 else 0
    shutil.rmtree(output, ignore_errors=True)
    return {
        "workers": workers, "cpus_per_worker": cpus, "torch_threads_per_worker": max(1, int(cpus)),
        "wall_s": wall, "reports": [(m.step, m.value) for m in hist],
        "pairs_per_s_median": rate,
        # every report covers the same number of steps, so this is the rate over that window
        "pairs_per_s_window": (len(rates) / sum(1 / r for r in rates)) if rates else None,
        "start_to_first_report_s": (hist[0].timestamp - run.info.start_time) / 1000 if hist else None,
        "first_to_last_report_s": span, "steps_first_to_last": steady_steps,
        "last_report_to_end_s": (run.info.end_time - hist[-1].timestamp) / 1000 if hist else None,
        "training_share_of_wall": args.job_steps * args.job_global_batch / rate / wall if rate else None,
        "foreign_cpu_share": mon.foreign_share,
    }


JOBS = {"w1c1": (1, 1.0), "w1c2": (1, 2.0), "w2c1": (2, 1.0)}


def run_jobs(args, pool_dir: Path, work: Path) -> dict:
    if not args.verbose:  # Ray Data sets up its own loggers (INFO to the console) when imported
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray

    train_main = load_job("train").main
    mlflow_uri = f"sqlite:///{work / 'mlflow.db'}"
    if not args.verbose:
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=args.verbose,
             logging_level=logging.INFO if args.verbose else logging.WARNING,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HGDPO_")}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    names = [v for v in args.jobs.split(",") if v]
    runs: dict[str, list[dict]] = defaultdict(list)
    try:
        for rep in range(args.job_repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):
                w, c = JOBS[name]
                r = run_job(args, train_main, pool_dir, work, name, w, c, rep, mlflow_uri)
                runs[name].append(r)
                print(f"  [{rep}] job {name}: workers={w} cpus_per_worker={c:g}: {r['pairs_per_s_median']:.1f} pairs/s "
                      f"(median of {len(r['reports']) - 1} reports), wall {r['wall_s']:.1f}s "
                      f"(to 1st report {r['start_to_first_report_s']:.1f}s, after last {r['last_report_to_end_s']:.1f}s)"
                      f"  others' CPU {r['foreign_cpu_share']:.0%}", flush=True)
    finally:
        ray.shutdown()
    return dict(runs)


# ---------------------------------------------------------------------------------------------
# Report


def summarize(res: dict) -> dict:
    out: dict = {}
    if "steps" in res:
        w, c = res["steps"]["wall_s"], res["steps"]["cpu_s"]
        out["steps"] = {n: {"wall_ms_median": 1e3 * median(v), "cpu_ms_median": 1e3 * median(c[n]),
                            "wall_ms_min": 1e3 * min(v), "repeats": len(v)} for n, v in w.items()}

        def compare(a, b):
            per_rep = [x / y for x, y in zip(w[a], w[b])]
            return {"ratio_of_medians": median(w[a]) / median(w[b]), "median_of_ratios": median(per_rep),
                    "ratio_of_mins": min(w[a]) / min(w[b]), "cpu_ratio_of_medians": median(c[a]) / median(c[b])}

        out["a_hgdpo_over_dpo"] = compare("ours_hgdpo", "ours_dpo")
        out["b_naive_over_ours"] = compare("naive_hgdpo", "ours_hgdpo")
    if "memory" in res:
        m = res["memory"]
        keys = {"first_step_peak_over_load": lambda r: r["first_step_peak_over_load"],
                "steady_step_peak_over_rss": lambda r: r["steady_step_peak_over_rss"],
                "tensor_peak": lambda r: r["tensors"]["peak_bytes"]}
        out["memory_mib"] = {n: {k: ratio(median([f(r) for r in rs]), MIB) for k, f in keys.items()}
                             for n, rs in m.items()}
        if "ours_hgdpo" in m and "naive_hgdpo" in m:
            o, n = out["memory_mib"]["ours_hgdpo"], out["memory_mib"]["naive_hgdpo"]
            out["b_memory_naive_over_ours"] = {k: ratio(n[k], o[k]) for k in keys}
    if "jobs" in res:
        out["jobs"] = {n: {"pairs_per_s_median": median([r["pairs_per_s_median"] for r in rs]),
                           "pairs_per_s_window": median([r["pairs_per_s_window"] for r in rs]),
                           "wall_s_median": median([r["wall_s"] for r in rs]),
                           "start_to_first_report_s": median([r["start_to_first_report_s"] for r in rs]),
                           "training_share_of_wall": median([r["training_share_of_wall"] for r in rs]),
                           "foreign_cpu_share": median([r["foreign_cpu_share"] for r in rs]),
                           "repeats": len(rs)} for n, rs in res["jobs"].items()}
        j = out["jobs"]
        for a, b in (("w2c1", "w1c1"), ("w2c1", "w1c2"), ("w1c2", "w1c1")):
            if a in j and b in j:
                out["jobs"][f"{a}_over_{b}"] = {"pairs_per_s": j[a]["pairs_per_s_median"] / j[b]["pairs_per_s_median"],
                                               "wall": j[a]["wall_s_median"] / j[b]["wall_s_median"]}
    return out


def table(s: dict, res: dict, args) -> str:
    lines = []
    if "steps" in s:
        lines += [(f"(a)/(b) one optimizer step, {args.pairs} pairs, CPU, {res['steps']['torch_threads']} torch threads, "
                   f"{s['steps']['ours_hgdpo']['repeats']} interleaved repeats; "
                   f"others' CPU {res['steps']['foreign_cpu_share']:.0%}"),
                  f"  {'variant':<13} {'wall ms (med)':>13} {'wall ms (min)':>13} {'cpu ms (med)':>12}"]
        for n, v in s["steps"].items():
            lines.append(f"  {n:<13} {v['wall_ms_median']:13.1f} {v['wall_ms_min']:13.1f} {v['cpu_ms_median']:12.1f}")
        for key, label in (("a_hgdpo_over_dpo", "(a) hgdpo / dpo      "), ("b_naive_over_ours", "(b) naive / ours time")):
            r = s[key]
            lines.append(f"  {label}: {r['ratio_of_medians']:.3f}x (median of per-repeat ratios "
                         f"{r['median_of_ratios']:.3f}x, of mins {r['ratio_of_mins']:.3f}x, CPU time {r['cpu_ratio_of_medians']:.3f}x)")
        lines.append("  loss check: " + ", ".join(f"{k} {v:.6g}" for k, v in res["steps"]["loss_check"].items()))
        lines.append("  where a step's time goes (ms, mean of the breakdown steps):")
        for n, p in res["steps"]["parts"].items():
            lines.append(f"    {n:<12} {1e3 * p['step_s']:7.1f} = " + ", ".join(
                f"{k} {1e3 * v:.1f}" for k, v in sorted(p["parts_s"].items(), key=lambda kv: -kv[1])))
    if "memory_mib" in s:
        lines += ["(b) peak memory (MiB; fresh process per variant, medians)",
                  f"  {'variant':<13} {'1st step over load':>18} {'steady step over RSS':>20} {'tensor peak':>12}"]

        def f(x):
            return "n/a" if x is None else f"{x:.1f}"

        for n, v in s["memory_mib"].items():
            lines.append(f"  {n:<13} {f(v['first_step_peak_over_load']):>18} {f(v['steady_step_peak_over_rss']):>20} "
                         f"{f(v['tensor_peak']):>12}")
        if "b_memory_naive_over_ours" in s:
            r = s["b_memory_naive_over_ours"]
            lines.append("  naive / ours: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}x'}" for k, v in r.items()))
    if "jobs" in s:
        lines += [(f"(c) jobs/train.py: global batch {args.job_global_batch}, micro-batch {args.job_micro_batch}, "
                   f"data_shards {args.job_data_shards}, {args.job_steps} steps, metrics every {args.metrics_every}; "
                   f"Ray num_cpus {args.ray_cpus}"),
                  (f"  {'job':<6} {'workers':>7} {'cpus/w':>6} {'pairs/s (med)':>13} {'pairs/s (window)':>16} "
                   f"{'wall s':>7} {'to 1st rep s':>12} {'train share':>11} {'others CPU':>10}")]
        for n, v in s["jobs"].items():
            if "_over_" in n:
                continue
            w, c = JOBS[n]
            lines.append(f"  {n:<6} {w:>7} {c:>6g} {v['pairs_per_s_median']:13.1f} {v['pairs_per_s_window']:16.1f} "
                         f"{v['wall_s_median']:7.1f} {v['start_to_first_report_s']:12.1f} "
                         f"{v['training_share_of_wall']:11.0%} {v['foreign_cpu_share']:10.0%}")
        for n, v in s["jobs"].items():
            if "_over_" in n:
                lines.append(f"  {n}: pairs/s {v['pairs_per_s']:.2f}x, wall {v['wall']:.2f}x")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="steps,memory,jobs,scale",
                   help="comma list of steps (a+b time), memory (b), jobs (c), scale (d: memory against the pool's size)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for (a)/(b)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch in (a)/(b)")
    p.add_argument("--repeats", type=int, default=60, help="interleaved timed steps per variant in (a)/(b)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--breakdown-steps", type=int, default=5, help="steps per variant timed by part")
    p.add_argument("--memory-steps", type=int, default=3, help="steps per memory process after the first")
    p.add_argument("--memory-repeats", type=int, default=1, help="fresh processes per memory variant")
    p.add_argument("--memory-variants", default="ours_hgdpo,naive_hgdpo", help=f"of {','.join(VARIANTS)}")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-prompts", type=int, default=16, help="prompts of the pool (hgdpo.world.prompts)")
    p.add_argument("--pool-images", type=int, default=4, help="images_per_prompt of the pool")
    p.add_argument("--pool-steps", type=int, default=10, help="sampler steps of the pool")
    p.add_argument("--jobs", default="w1c1,w1c2,w2c1", help=f"comma list of {','.join(JOBS)} (workers, cpus_per_worker)")
    p.add_argument("--job-steps", type=int, default=150, help="max_steps of each job run")
    p.add_argument("--job-repeats", type=int, default=2, help="runs of each job variant, interleaved")
    p.add_argument("--job-global-batch", type=int, default=8)
    p.add_argument("--job-micro-batch", type=int, default=4)
    p.add_argument("--job-data-shards", type=int, default=2)
    p.add_argument("--metrics-every", type=int, default=10, help="metrics_every of the job (one pairs/s report each)")
    p.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of the local ray.init")
    p.add_argument("--scale-rows", default="500,2000,8000", help="(d) pool sizes R (prompts; N=20 at 704x1024)")
    p.add_argument("--scale-steps", type=int, default=30, help="(d) max_steps of each job")
    p.add_argument("--baseline", default=None, help="(d) also run the jobs from this git revision, side by side")
    p.add_argument("--baseline-rows", default="500", help="(d) the pool sizes the baseline runs on")
    p.add_argument("--workdir", default=None, help="keep the pool here and reuse it (default: a temporary directory)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-inputs", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child_memory:
        print(json.dumps(memory_child(args, args.child_memory, Path(args.child_inputs))))
        return 0
    parts = {p for p in args.parts.split(",") if p}
    sys.path.insert(0, str(ROOT))
    import torch

    from hgdpo.infra.quiet import quiet_libraries

    quiet_libraries()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all, load_before = time.time(), os.getloadavg()
    res: dict = {}
    try:
        if parts & {"steps", "memory", "jobs"}:
            print(f"bench_train: pool of {args.pool_prompts} prompts x {args.pool_images} images, "
                  f"{args.pool_steps} steps", flush=True)
            pool_dir, pool_s = build_pool(args, work)
            res["pool"] = {"path": str(pool_dir), "build_s": pool_s}
        inputs_file = work / f"inputs-{args.pairs}.pt"
        if parts & {"steps", "memory"}:
            from hgdpo.models import loading as models

            pipe = models.load_pipeline("embedded")
            inputs = load_pairs(pool_dir, args.pairs)
            inputs["px_w"], inputs["px_l"] = to_pixels(pipe.vae, inputs["lat_w"]), to_pixels(pipe.vae, inputs["lat_l"])
            torch.save(inputs, inputs_file)
            del pipe
        if "steps" in parts:
            print(f"(a)/(b) steps: {args.pairs} pairs, {args.threads} torch threads, {args.repeats} repeats", flush=True)
            res["steps"] = run_steps(args, inputs_file)
        if "memory" in parts:
            print("(b) memory: one fresh process per variant", flush=True)
            child = [f"--threads={args.threads}", f"--pairs={args.pairs}", f"--lora-rank={args.lora_rank}",
                     f"--learning-rate={args.learning_rate}", f"--seed={args.seed}",
                     f"--memory-steps={args.memory_steps}"]
            with LoadMonitor() as mon:
                res["memory"] = run_memory(args, child, inputs_file)
            res["memory_foreign_cpu_share"] = mon.foreign_share
        if "jobs" in parts:
            print(f"(c) jobs/train.py: {args.jobs}, {args.job_repeats} repeats, {args.job_steps} steps", flush=True)
            res["jobs"] = run_jobs(args, pool_dir, work)
        if "scale" in parts:
            print(f"(d) scale: pools of {args.scale_rows} prompts, {args.scale_steps} steps each", flush=True)
            res["scale"] = train_scale.run_scale(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    import diffusers
    import peft

    summary = summarize(res)
    if "scale" in res:
        summary["scale"] = train_scale.summarize(res["scale"])
    mach = machine(torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__)
    mach["loadavg_before"], mach["loadavg_after"] = load_before, mach.pop("loadavg")
    result = {
        "machine": mach,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "definitions": {
            "wall_ms": "one optimizer step: loss (micro_step or the naive step), backward, clip, AdamW, LR schedule; "
                       "the step's inputs (pairs, timesteps, noise) are ready beforehand",
            "ratio_of_medians": "median wall time of the first variant / that of the second",
            "median_of_ratios": "median over repeats of the two variants' times in the same repeat",
            "first_step_peak_over_load": "peak RSS (VmHWM, reset after loading) during variant setup + the first "
                                         "step, minus RSS after loading the pipeline: reference copy, LoRA, optimizer "
                                         "state, oneDNN caches and one step's buffers",
            "steady_step_peak_over_rss": "peak RSS during later steps minus RSS just before them",
            "tensor_peak": "torch profiler memory timeline: bytes of tensors alive at the worst moment of one step "
                           "(those the step touched or made: parameters, optimizer state, inputs, activations, "
                           "gradients, temporaries), allocator-independent",
            "pairs_per_s": "the job's MLflow metric (rank 0: steps x global batch / seconds since the previous "
                           "report), first report left out; median over reports, then over repeats",
            "pairs_per_s_window": "harmonic mean of those reports: pairs / seconds over the window",
            "training_share_of_wall": "job steps x global batch / pairs_per_s / wall of main()",
            "foreign_cpu_share": "CPU of processes not started by the benchmark / (wall x cores)"},
        "summary": summary, "runs": res, "total_seconds": time.time() - t_all}
    print()
    print(table(summary, res, args))
    if "scale" in res:
        print(train_scale.table(res["scale"], summary["scale"]))
    save(args.out, result)
    print(f"results: {args.out}  ({result['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
