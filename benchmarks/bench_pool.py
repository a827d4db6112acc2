"""Benchmark of the preference-pool builder: the Ray Data job against a plain loop and the bare model calls.

One run measures, on the embedded default model, with the same prompts and settings:

* ``loop``    -- one fresh Python process, no Ray: import, load pipeline + scorer, then per prompt
  ``generate``, ``pickscore``, rank, PNG-encode winner/loser, and every ``rows_per_file`` prompts
  one parquet part (``hgdpo.pool.to_table`` / ``write_part``). Torch uses ``--loop-threads``
  (default: torch's default, all cores).
* ``job1`` / ``job2`` -- ``hgdpo.pool_builder.build_pool`` in this process with one / two generator
  actors, on one local ``ray.init(num_cpus=--ray-cpus)`` started before any timing.
* ``calls@T`` -- the unavoidable model calls alone, T torch threads, warm: the UNet (one batch of 2N
  per step: classifier-free guidance), the VAE decode, the text encoder and PickScore, each timed
  inside the pipeline by wrapping the modules; nothing else is counted.

Throughput is images/s. *End to end*: from the start of the variant (the loop's process spawn; the
``build_pool`` call) to the last row on disk, so interpreter start, imports, model loading, actor
start and the job's checks all count. *Steady state*: N x the least-squares slope of rows done
against time over the parts after the first, part times being the files' mtimes (parts are written
under a temporary name, then renamed); it leaves out loading, actor start, the first part's
prompts (warm-up) and any delay of the first write.

Runs during which other processes (other users of a shared machine) took more than
``--max-foreign`` of the CPUs are left out of the medians when a quieter run exists.

    HGDPO_HOME=/tmp/hgh python benchmarks/bench_pool.py              # ~6-7 minutes on a quiet 2-core box
    python benchmarks/bench_pool.py --prompts 8 --repeats 1 --variants loop,job1 --out /tmp/p.json
    python benchmarks/bench_pool.py --profile                          # + where the job's time goes

What-ifs (measure a proposed change without editing the library): ``--generator-threads K``,
``--block-per-prompt``, ``--ray-system-config JSON``; see ``--help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pool.json"
COLORS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")


def make_prompts(n: int) -> list[str]:
    """``n`` distinct short prompts of the embedded model's world (shapes, colours, places)."""
    return [f"a {('large', 'small')[(i // 18) % 2]} {COLORS[i % 6]} {SHAPES[(i // 6) % 3]} {PLACES[i % 5]}, #{i}"
            for i in range(n)]


def cpu_info() -> dict:
    model = platform.processor() or ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# CPU accounting: ours by process kind, and other users' of a shared machine


def _kind(title: str) -> str:
    for key, kind in (("GenerateImages", "generator actors"), ("ScoreAndRank", "scorer actor"),
                      ("write_rows", "write_rows tasks"), ("--child-loop", "loop process"),
                      ("raylet", "ray system"), ("gcs_server", "ray system"), ("ray::IDLE", "ray idle workers"),
                      ("default_worker", "ray idle workers"), ("ray::", "ray helper actors")):
        if key in title:
            return kind
    return "ray system" if "ray" in title else "other (ours)"


FINAL_KINDS = ("generator actors", "scorer actor", "write_rows tasks", "loop process")


class CpuMonitor:
    """Samples every process's CPU time each ``interval`` s in a thread.

    Processes below this one (the loop's child, the local Ray's raylet, workers and actors) are
    ours and summed by kind; the rest is *foreign*: other users of the machine. ``foreign_share``
    is their CPU seconds / (wall seconds x cores). Processes living less than an interval are
    missed, so the figures are lower bounds.
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.me = interval, os.getpid()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            mine = {p.pid for p in psutil.Process(self.me).children(recursive=True)}
        except psutil.Error:
            mine = set()
        for proc in psutil.process_iter():
            pid = proc.pid
            try:
                t = proc.cpu_times()
                if pid in mine and self.kind.get(pid) not in FINAL_KINDS:  # Ray retitles its workers
                    self.kind[pid] = _kind(" ".join(proc.cmdline()))
            except psutil.Error:
                continue
            cpu = t.user + t.system
            if pid not in self.first:
                # a process born during the run counts from zero; one alive at the start from then
                self.first[pid] = cpu if not self._started else 0.0
            self.last[pid] = cpu
            if pid == self.me:
                self.kind[pid] = "driver (this process)"
            elif pid not in mine and pid not in self.kind:
                self.kind[pid] = "foreign"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._started = False
        self._sample()
        self._started = True
        self.start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self.start
        by: dict[str, float] = defaultdict(float)
        procs: dict[str, int] = defaultdict(int)
        for pid, cpu in self.last.items():
            used = max(0.0, cpu - self.first[pid])
            kind = self.kind.get(pid, "foreign")
            by[kind] += used
            if used > 0.05:
                procs[kind] += 1
        self.cpu_s = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        self.processes = dict(procs)
        self.foreign_share = by.get("foreign", 0.0) / (self.seconds * (os.cpu_count() or 1))


def wait_quiet(limit: float, max_share: float, window: float = 3.0) -> float:
    """Wait up to ``limit`` s for a ``window`` in which other users take at most ``max_share`` of the CPUs."""
    start = time.perf_counter()
    while True:
        with CpuMonitor() as mon:
            time.sleep(window)
        if mon.foreign_share <= max_share or time.perf_counter() - start >= limit:
            return mon.foreign_share


# ---------------------------------------------------------------------------------------------
# Measuring runs by their parts on disk


def part_times(out_dir: Path) -> list[tuple[float, int]]:
    """(mtime, rows) of each part of a pool directory, oldest first."""
    import pyarrow.parquet as pq

    return sorted((p.stat().st_mtime_ns / 1e9, pq.read_metadata(p).num_rows) for p in out_dir.glob("part-*.parquet"))


def steady_rate(parts: list[tuple[float, int]]) -> float | None:
    """Rows per second once the pipeline is full: the least-squares slope of rows done against time
    over the parts after the first (whose time holds the startup and any first-write delay)."""
    done, points = parts[0][1], []
    for t, rows in parts[1:]:
        done += rows
        points.append((t, done))
    if len(points) < 2:
        return None
    mt = statistics.mean(t for t, _ in points)
    mr = statistics.mean(r for _, r in points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (r - mr) for t, r in points) / var if var > 0 else None


def measures(prompts: int, n: int, start: float, end: float, parts: list[tuple[float, int]]) -> dict:
    """End-to-end and steady-state figures of one run from its start, its end and its parts."""
    rows = sum(r for _, r in parts)
    if rows != prompts:
        raise RuntimeError(f"expected {prompts} rows on disk, found {rows}")
    last = max(end, parts[-1][0])
    out = {"seconds": last - start, "images_per_s": prompts * n / (last - start),
           "first_row_s": parts[0][0] - start, "parts": len(parts), "part_rows": [r for _, r in parts],
           "part_times_s": [round(t - start, 3) for t, _ in parts]}
    rate = steady_rate(parts)
    if rate:
        out.update(steady_images_per_s=rate * n, steady_s_per_prompt=1 / rate)
    return out


# ---------------------------------------------------------------------------------------------
# The loop (run in a child process: python bench_pool.py ... --child-loop DIR)


def loop_child(items, args, out_dir: Path, threads: int) -> dict:
    """The job's work in this process, without Ray. Returns timestamps (time.time())."""
    started = time.time()
    import numpy as np
    import torch

    from hgdpo import models, pool
    from hgdpo.quiet import quiet_libraries
    from hgdpo.sampling import generate, image_seeds, native_size, resolve_device_dtype, set_sampler
    from hgdpo.scoring import pickscore, rank

    quiet_libraries()
    imported = time.time()
    torch.set_num_threads(threads)
    n = args.images_per_prompt
    device, dtype = resolve_device_dtype("auto")
    pipe = models.load_pipeline("embedded", dtype=dtype, device=device)
    set_sampler(pipe, "dpm_multistep")
    width, height = native_size(pipe)
    processor, scorer = models.load_scorer("embedded", dtype=dtype, device=device)
    loaded = time.time()
    f = pipe.vae_scale_factor
    latent_shape = (n, pipe.unet.config.in_channels, height // f, width // f)
    rows: dict[str, list] = defaultdict(list)

    def flush():
        if rows:
            pool.write_part(str(out_dir), pool.to_table(rows, latent_shape))
            rows.clear()

    for p in items:
        seeds = image_seeds(args.seed, p.id, n)
        latents, images = generate(pipe, p.text, seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                                   width=width, height=height)
        scores = pickscore(processor, scorer, p.text, images)
        order = rank(scores)
        w, l = int(order[0]), int(order[n - 1])
        keep = np.arange(n, dtype=np.int32)  # keep="all", as the job's default
        for key, value in (("prompt_id", p.id), ("prompt_index", p.index), ("prompt", p.text),
                           ("seeds", np.asarray(seeds, np.int64)), ("scores", scores.astype(np.float32)),
                           ("rank", order), ("winner", w), ("loser", l), ("latent_index", keep),
                           ("latents", latents[keep]), ("image_w", pool.png_bytes(images[w])),
                           ("image_l", pool.png_bytes(images[l]))):
            rows[key].append(value)
        if len(rows["prompt_id"]) >= args.rows_per_file:
            flush()
    flush()
    return {"started": started, "imported": imported, "loaded": loaded, "end": time.time(),
            "torch_threads": torch.get_num_threads()}


def run_loop(args, argv: list[str], out_dir: Path, threads: int) -> dict:
    out_dir.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child-loop", str(out_dir),
           "--loop-threads", str(threads)]
    start = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"the loop process failed ({proc.returncode})")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    out = measures(args.prompts, args.images_per_prompt, start, child["end"], part_times(out_dir))
    out.update(process_start_s=child["started"] - start, import_s=child["imported"] - child["started"],
               load_s=child["loaded"] - child["imported"], torch_threads=child["torch_threads"])
    return out


# ---------------------------------------------------------------------------------------------
# The job, optionally instrumented (--profile)


def _note(path: str, **event) -> None:
    event.update(t=time.time(), pid=os.getpid())
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def _instrumented(log: str, generator_threads: int | None):
    """Subclasses of the job's stages that log when each actor starts and each batch runs.

    Defined here (so pickled by value): the actors run the library's own code between the notes.
    ``generator_threads`` (a what-if) sets the generator's torch threads after its ``__init__``.
    """
    import hgdpo.pool_builder as pb

    base_write = pb.write_rows

    class GenerateImages(pb.GenerateImages):
        def __init__(self, config):
            import psutil

            _note(log, ev="gen_init", proc_start=psutil.Process().create_time())
            t = time.time()
            import diffusers, torch, transformers  # noqa: E401,F401

            _note(log, ev="gen_imported", s=time.time() - t)
            super().__init__(config)
            if generator_threads:
                torch.set_num_threads(generator_threads)
            _note(log, ev="gen_ready", threads=torch.get_num_threads())

        def __call__(self, batch):
            _note(log, ev="gen_start")
            out = super().__call__(batch)
            _note(log, ev="gen_end", ids=[str(i) for i in batch["prompt_id"]])
            return out

    class ScoreAndRank(pb.ScoreAndRank):
        def __init__(self, config):
            import psutil
            import torch

            _note(log, ev="score_init", proc_start=psutil.Process().create_time())
            super().__init__(config)
            _note(log, ev="score_ready", threads=torch.get_num_threads())

        def __call__(self, batch):
            _note(log, ev="score_start", ids=[str(i) for i in batch["prompt_id"]])
            out = super().__call__(batch)
            _note(log, ev="score_end", ids=[str(i) for i in batch["prompt_id"]])
            return out

    def write_rows(batch, output, latent_shape):
        _note(log, ev="write_start", ids=[str(i) for i in batch["prompt_id"]])
        out = base_write(batch, output, latent_shape)
        _note(log, ev="write_end", ids=[str(i) for i in batch["prompt_id"]])
        return out

    return GenerateImages, ScoreAndRank, write_rows


def timeline(log: Path, start: float) -> dict:
    """Where a job's time went, from the notes of its instrumented stages."""
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not events:
        return {}
    by = defaultdict(list)
    for e in events:
        by[e["ev"]].append(e)
    rel = lambda t: round(t - start, 3)  # noqa: E731
    out: dict = {}
    gens = sorted(by["gen_init"], key=lambda e: e["t"])
    out["generator_process_start_s"] = [rel(e["proc_start"]) for e in gens]
    out["generator_init_entered_s"] = [rel(e["t"]) for e in gens]
    out["generator_imports_s"] = [round(e["s"], 2) for e in by["gen_imported"]]
    out["generator_ready_s"] = [rel(e["t"]) for e in sorted(by["gen_ready"], key=lambda e: e["t"])]
    out["generator_torch_threads"] = [e["threads"] for e in by["gen_ready"]]
    if by["score_init"]:
        out["scorer_process_start_s"] = rel(by["score_init"][0]["proc_start"])
        out["scorer_ready_s"] = rel(by["score_ready"][0]["t"])
        out["scorer_torch_threads"] = by["score_ready"][0]["threads"]
    # per generator actor: call durations, and how busy it was from its first call to its last
    calls, busy = [], []
    for pid in {e["pid"] for e in by["gen_start"]}:
        starts = sorted(e["t"] for e in by["gen_start"] if e["pid"] == pid)
        ends = sorted(e["t"] for e in by["gen_end"] if e["pid"] == pid)
        durations = [b - a for a, b in zip(starts, ends)]
        calls += durations[1:] or durations
        if ends:
            busy.append(sum(durations) / max(1e-9, ends[-1] - starts[0]))
    out["first_generate_s"] = rel(min(e["t"] for e in by["gen_start"])) if by["gen_start"] else None
    out["generate_s_per_prompt"] = statistics.mean(calls) if calls else None
    out["generator_busy_fraction"] = busy
    gen_end = {i: e["t"] for e in by["gen_end"] for i in e["ids"]}
    score_start = {i: e["t"] for e in by["score_start"] for i in e["ids"]}
    score_end = {i: e["t"] for e in by["score_end"] for i in e["ids"]}
    write_end = {i: e["t"] for e in by["write_end"] for i in e["ids"]}
    scores = [score_end[i] - score_start[i] for i in score_start if i in score_end]
    out["score_s_per_prompt"] = statistics.mean(scores) if scores else None
    lat = lambda a, b: [b[i] - a[i] for i in a if i in b]  # noqa: E731
    for name, values in (("generated_to_scoring_s", lat(gen_end, score_start)),
                         ("scored_to_written_s", lat(score_end, write_end))):
        if values:
            out[name] = {"mean": statistics.mean(values), "max": max(values)}
    out["write_rows_tasks"] = len(by["write_start"])
    out["write_rows_processes"] = len({e["pid"] for e in by["write_start"]})
    return out


def run_job(args, prompts_file: Path, out_dir: Path, actors: int, gen_cpus: float, scorer_cpus: float,
            profile_log: Path | None = None, generator_threads: int | None = None) -> dict:
    """``build_pool`` in this process, on the Ray started by ``main``."""
    import hgdpo.pool_builder as pb
    from hgdpo.pool_config import PoolConfig

    cfg = PoolConfig(prompts=str(prompts_file), output=str(out_dir), images_per_prompt=args.images_per_prompt,
                     steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                     generator_actors=actors, generator_cpus=gen_cpus, scorer_actors=1, scorer_cpus=scorer_cpus,
                     rows_per_file=args.rows_per_file)
    import ray

    saved = pb.GenerateImages, pb.ScoreAndRank, pb.write_rows, ray.data.from_items
    if profile_log is not None:
        pb.GenerateImages, pb.ScoreAndRank, pb.write_rows = _instrumented(str(profile_log), generator_threads)
    if args.block_per_prompt:  # what-if: one prompt per input block (the job uses max(8, 4 x actors) blocks)
        ray.data.from_items = lambda items, **kw: saved[3](items, override_num_blocks=len(items))
    log: list[tuple[float, str]] = []
    try:
        start = time.time()
        result = pb.build_pool(cfg, log=lambda msg: log.append((time.time(), msg)))
        end = time.time()
    finally:
        pb.GenerateImages, pb.ScoreAndRank, pb.write_rows, ray.data.from_items = saved
    out = measures(result.built, cfg.images_per_prompt, start, end, part_times(out_dir))
    prepared = next((t for t, m in log if " to build " in m), start)  # the driver's checks are done then
    out.update(prepare_s=prepared - start, generator_actors=actors, generator_cpus=gen_cpus, scorer_cpus=scorer_cpus,
               generator_torch_threads=generator_threads or max(1, int(gen_cpus + 1e-9)),
               scorer_torch_threads=max(1, int(scorer_cpus)))
    if profile_log is not None:
        out["profile"] = timeline(profile_log, start)
    return out


# ---------------------------------------------------------------------------------------------
# The model calls alone


def run_calls(items, args, threads: int) -> dict:
    """UNet, VAE decode, text encoder and PickScore calls alone (models loaded and warmed up untimed)."""
    import torch

    from hgdpo import models
    from hgdpo.sampling import generate, image_seeds, native_size, resolve_device_dtype, set_sampler
    from hgdpo.scoring import pickscore

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device, dtype = resolve_device_dtype("auto")
        pipe = models.load_pipeline("embedded", dtype=dtype, device=device)
        set_sampler(pipe, "dpm_multistep")
        width, height = native_size(pipe)
        processor, scorer = models.load_scorer("embedded", dtype=dtype, device=device)
        spent: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        batch: dict[str, int] = {}

        def timed(name, fn):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[name] += time.perf_counter() - t
                    calls[name] += 1
                    x = a[0] if a else kw.get("sample", kw.get("input_ids"))
                    if hasattr(x, "shape"):
                        batch[name] = int(x.shape[0])
            return wrapper

        pipe.unet.forward = timed("unet", pipe.unet.forward)
        pipe.vae.decode = timed("vae_decode", pipe.vae.decode)
        pipe.text_encoder.forward = timed("text_encoder", pipe.text_encoder.forward)
        score = timed("scoring", lambda text, images: pickscore(processor, scorer, text, images))

        def one(p):
            seeds = image_seeds(args.seed, p.id, args.images_per_prompt)
            _, images = generate(pipe, p.text, seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                                 width=width, height=height)
            score(p.text, images)

        one(type(items[0])(0, "warm-up", "a warm-up prompt"))  # first-call costs (kernel setup) not counted
        spent.clear(), calls.clear()
        start = time.perf_counter()
        for p in items:
            one(p)
        wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    total = sum(spent.values())
    return {"torch_threads": threads, "seconds": total, "images_per_s": len(items) * args.images_per_prompt / total,
            "per_prompt_s": total / len(items), "generate_and_score_wall_s": wall, "parts_s": dict(spent),
            "calls": dict(calls), "batch": batch}


# ---------------------------------------------------------------------------------------------
# Report


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def clean_runs(rs: list[dict], max_foreign: float) -> list[dict]:
    """The runs during which other users left the CPUs alone (all of them if there is none)."""
    clean = [r for r in rs if r.get("foreign_cpu_share", 0.0) <= max_foreign]
    return clean or rs


def summarize(runs: dict[str, list[dict]], loop_threads: int, max_foreign: float) -> dict:
    """Medians of each variant over its quiet runs (others' CPU share <= ``max_foreign``), and the ratios."""
    keys = ("seconds", "images_per_s", "first_row_s", "steady_images_per_s", "steady_s_per_prompt", "per_prompt_s",
            "process_start_s", "import_s", "load_s", "prepare_s", "foreign_cpu_share")
    summary = {}
    for name, rs in runs.items():
        use = clean_runs(rs, max_foreign)
        s = {k: median([r.get(k) for r in use]) for k in keys if any(k in r for r in use)}
        s.update(runs=len(rs), quiet_runs=sum(r.get("foreign_cpu_share", 0.0) <= max_foreign for r in rs))
        if name.startswith("calls"):
            s["parts_s_per_prompt"] = {k: median([r["parts_s"][k] / (r["seconds"] / r["per_prompt_s"]) for r in use])
                                       for k in use[0]["parts_s"]}
            s["unet_calls_per_prompt"] = use[0]["calls"].get("unet", 0) * use[0]["per_prompt_s"] / use[0]["seconds"]
            s["unet_batch"] = use[0]["batch"].get("unet")
        summary[name] = s
    loop, calls = summary.get("loop"), summary.get(f"calls@{loop_threads}")
    for name, s in summary.items():
        if name.startswith("calls"):
            continue
        if loop and name != "loop":
            s["ratio_vs_loop"] = s["images_per_s"] / loop["images_per_s"]
            if s.get("steady_images_per_s") and loop.get("steady_images_per_s"):
                s["steady_ratio_vs_loop"] = s["steady_images_per_s"] / loop["steady_images_per_s"]
        if calls:
            s["overhead_vs_calls"] = s["seconds"] / calls["seconds"] - 1
            if s.get("steady_s_per_prompt"):
                s["steady_overhead_vs_calls"] = s["steady_s_per_prompt"] / calls["per_prompt_s"] - 1
    return summary


def targets(summary: dict) -> dict:
    out = {}
    for name, check, key, goal in (("job1", "at_least_0.9x_loop", "ratio_vs_loop", lambda v: v >= 0.9),
                                   ("job1", "steady_at_least_0.9x_loop", "steady_ratio_vs_loop", lambda v: v >= 0.9),
                                   ("job2", "faster_than_loop", "ratio_vs_loop", lambda v: v > 1.0),
                                   ("job2", "steady_faster_than_loop", "steady_ratio_vs_loop", lambda v: v > 1.0),
                                   ("job1", "overhead_below_15pct", "overhead_vs_calls", lambda v: v < 0.15),
                                   ("job2", "overhead_below_15pct", "overhead_vs_calls", lambda v: v < 0.15)):
        value = summary.get(name, {}).get(key)
        if value is not None:
            out[f"{name}_{check}"] = bool(goal(value))
    return out


def fmt(v, spec=".2f", pct=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.0f}%" if pct else format(v, spec)


def table(summary: dict) -> str:
    head = ("variant", "e2e s", "img/s", "x loop", "1st row s", "steady img/s", "x loop", "ovh e2e", "ovh steady",
            "others' CPU")
    lines = [head]
    for name, s in summary.items():
        if name.startswith("calls"):
            lines.append((name, fmt(s["seconds"], ".1f"), fmt(s["images_per_s"]), "", "", "", "", "", "",
                          fmt(s.get("foreign_cpu_share"), ".0%")))
        else:
            lines.append((name, fmt(s["seconds"], ".1f"), fmt(s["images_per_s"]), fmt(s.get("ratio_vs_loop")),
                          fmt(s.get("first_row_s"), ".1f"), fmt(s.get("steady_images_per_s")),
                          fmt(s.get("steady_ratio_vs_loop")), fmt(s.get("overhead_vs_calls"), pct=True),
                          fmt(s.get("steady_overhead_vs_calls"), pct=True), fmt(s.get("foreign_cpu_share"), ".0%")))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def profile_text(name: str, run: dict) -> str:
    p, lines = run.get("profile") or {}, []
    if p:
        lines.append(f"{name}: prepare {run['prepare_s']:.1f}s; generator process up at "
                     f"{p['generator_process_start_s']}s, in __init__ at {p['generator_init_entered_s']}s "
                     f"(imports {p['generator_imports_s']}s), ready at {p['generator_ready_s']}s "
                     f"({p['generator_torch_threads']} torch threads); scorer ready at {p.get('scorer_ready_s')}s; "
                     f"first generate at {p['first_generate_s']}s, first row at {run['first_row_s']:.1f}s")
        lines.append(f"{' ' * len(name)}  generate {fmt(p['generate_s_per_prompt'], '.3f')}s/prompt, score "
                     f"{fmt(p['score_s_per_prompt'], '.3f')}s/prompt; generator busy "
                     f"{', '.join(f'{b:.0%}' for b in p['generator_busy_fraction'])} of its time after its first call; "
                     f"generated->scoring {fmt(p.get('generated_to_scoring_s', {}).get('mean'), '.2f')}s, "
                     f"scored->written mean {fmt(p.get('scored_to_written_s', {}).get('mean'), '.2f')}s "
                     f"max {fmt(p.get('scored_to_written_s', {}).get('max'), '.2f')}s; {p['write_rows_tasks']} "
                     f"write_rows tasks in {p['write_rows_processes']} worker processes")
    if run.get("cpu_s"):
        lines.append(f"{' ' * len(name)}  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in run["cpu_s"].items()
                                                              if v >= 0.05))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", type=int, default=48, help="number of prompts")
    p.add_argument("--images-per-prompt", type=int, default=8, help="N images per prompt")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved (medians of the quiet ones reported)")
    p.add_argument("--rows-per-file", type=int, default=4,
                   help="prompts per parquet part, for loop and job (the steady state needs several parts)")
    p.add_argument("--variants", default="loop,job1,job2,calls", help="comma list of loop, job1, job2, calls")
    p.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of the local ray.init (logical CPUs)")
    p.add_argument("--loop-threads", type=int, default=None,
                   help="torch threads of the loop (default: torch's default, all cores)")
    p.add_argument("--calls-threads", default=None,
                   help="comma list of torch thread counts for the calls alone (default: the loop's, and 1)")
    p.add_argument("--job1-cpus", default="1,1", help="generator_cpus,scorer_cpus of the one-actor job")
    p.add_argument("--job2-cpus", default="0.75,0.5", help="generator_cpus,scorer_cpus of the two-actor job")
    p.add_argument("--profile", action="store_true",
                   help="instrument the job's stages: actor start, per-batch times, latencies (and print them)")
    p.add_argument("--generator-threads", type=int, default=None,
                   help="what-if (needs --profile): generator actors' torch threads, set after their __init__")
    p.add_argument("--block-per-prompt", action="store_true",
                   help="what-if: the job's input dataset gets one block per prompt (so the stages hand over "
                        "each prompt as soon as it is done) instead of max(8, 4 x generator_actors) blocks")
    p.add_argument("--ray-system-config", default=None,
                   help='what-if: JSON of Ray system settings for ray.init, e.g. \'{"num_workers_soft_limit": 8}\'')
    p.add_argument("--wait-quiet", type=float, default=60.0,
                   help="before each variant wait up to this many s for other users to leave the CPUs (0: no wait)")
    p.add_argument("--max-foreign", type=float, default=0.1,
                   help="share of the CPUs other processes may use for the machine to count as quiet")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    p.add_argument("--workdir", default=None, help="where pools are written (default: a temporary directory)")
    p.add_argument("--child-loop", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from hgdpo import prompts as prompt_io

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pool-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts_file = work / "prompts.txt"

    if args.child_loop:  # the loop's own process
        items = prompt_io.read_prompts(prompts_file)
        print(json.dumps(loop_child(items, args, Path(args.child_loop), args.loop_threads)))
        return 0
    if args.generator_threads and not args.profile:
        sys.exit("--generator-threads needs --profile")

    import torch

    from hgdpo import embedded
    from hgdpo.quiet import quiet_libraries

    quiet_libraries()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    loop_threads = args.loop_threads or torch.get_num_threads()
    calls_threads = [int(t) for t in args.calls_threads.split(",")] if args.calls_threads else \
        list(dict.fromkeys([loop_threads, 1]))
    jobs = {name: (actors, *map(float, getattr(args, f"{name}_cpus").split(",")))
            for name, actors in (("job1", 1), ("job2", 2)) if name in variants}
    for name, (actors, gen, sc) in jobs.items():
        if actors * gen + sc > args.ray_cpus + 1e-9:
            sys.exit(f"{name}: {actors} x generator_cpus {gen} + scorer_cpus {sc} > the {args.ray_cpus} CPUs of Ray: "
                     f"the actors could not all start")
    prompts_file.write_text("\n".join(make_prompts(args.prompts)) + "\n")
    items = prompt_io.read_prompts(prompts_file)
    embedded.pipeline_dir(), embedded.scorer_dir()  # build the embedded models once, before any timing
    child_argv = [f"--prompts={args.prompts}", f"--images-per-prompt={args.images_per_prompt}",
                  f"--steps={args.steps}", f"--guidance-scale={args.guidance_scale}", f"--seed={args.seed}",
                  f"--rows-per-file={args.rows_per_file}", f"--workdir={work}"]

    settings = dict(prompts=args.prompts, images_per_prompt=args.images_per_prompt, steps=args.steps,
                    guidance_scale=args.guidance_scale, sampler="dpm_multistep", dtype="float32",
                    image_size=embedded.IMAGE_SIZE, keep="all", rows_per_file=args.rows_per_file,
                    repeats=args.repeats, ray_num_cpus=args.ray_cpus, loop_torch_threads=loop_threads,
                    calls_torch_threads=calls_threads, profile=args.profile, what_if_generator_threads=args.generator_threads,
                    what_if_block_per_prompt=args.block_per_prompt,
                    what_if_ray_system_config=args.ray_system_config and json.loads(args.ray_system_config),
                    jobs={k: {"generator_actors": a, "generator_cpus": g, "scorer_actors": 1, "scorer_cpus": s,
                              "generator_torch_threads": args.generator_threads or max(1, int(g + 1e-9)),
                              "scorer_torch_threads": max(1, int(s + 1e-9))} for k, (a, g, s) in jobs.items()})
    print(f"bench_pool: {json.dumps(settings)}", flush=True)
    import ray

    if jobs:
        extra = {"_system_config": json.loads(args.ray_system_config)} if args.ray_system_config else {}
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, **extra,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HGDPO_")}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        if __name__ != "__main__":  # imported as a module: ship the instrumented classes by value
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runs: dict[str, list[dict]] = defaultdict(list)
    t_all, load_before = time.time(), os.getloadavg()

    def measured(rep, name, fn, *a, **kw):
        quiet = wait_quiet(args.wait_quiet, args.max_foreign) if args.wait_quiet > 0 else None
        with CpuMonitor() as mon:
            r = fn(*a, **kw)
        r.update(foreign_cpu_share=mon.foreign_share, foreign_share_before=quiet, cpu_s=mon.cpu_s,
                 processes=mon.processes)
        runs[name].append(r)
        line = f"[{rep}] {name:<8} {r['seconds']:6.1f}s {r['images_per_s']:6.2f} img/s"
        if "steady_images_per_s" in r:
            line += f"  steady {r['steady_images_per_s']:5.2f} img/s  first row {r['first_row_s']:5.1f}s"
        if "parts_s" in r:
            line += "  " + ", ".join(f"{k} {v:.1f}s" for k, v in r["parts_s"].items())
        print(line + f"  (others' CPU {mon.foreign_share:.0%})", flush=True)
        if args.profile and name.startswith("job"):
            print(profile_text(f"[{rep}] {name}", r), flush=True)

    try:
        for rep in range(args.repeats):
            if "loop" in variants:
                measured(rep, "loop", run_loop, args, child_argv, work / f"loop-{rep}", loop_threads)
            for name, (actors, gen, sc) in jobs.items():
                measured(rep, name, run_job, args, prompts_file, work / f"{name}-{rep}", actors, gen, sc,
                         profile_log=work / f"{name}-{rep}.events.jsonl" if args.profile else None,
                         generator_threads=args.generator_threads)
            if "calls" in variants:
                for t in calls_threads:
                    measured(rep, f"calls@{t}", run_calls, items, args, t)
    finally:
        if jobs:
            ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(runs, loop_threads, args.max_foreign)
    result = {
        "machine": dict(cpu_info(), loadavg_before=load_before, loadavg_after=os.getloadavg(),
                        torch=torch.__version__, ray=ray.__version__, diffusers=__import__("diffusers").__version__),
        "settings": settings,
        "definitions": {
            "images_per_s": "prompts x N / (last row on disk - start of the variant: loop process spawn or "
                            "build_pool call)",
            "steady_images_per_s": "N x least-squares slope of rows done against part mtime, parts after the first",
            "ratio_vs_loop": "images/s / loop images/s (medians over repeats)",
            "overhead_vs_calls": f"seconds / seconds of calls@{loop_threads} - 1",
            "steady_overhead_vs_calls": f"steady s per prompt / calls@{loop_threads} s per prompt - 1",
            "foreign_cpu_share": "CPU s of processes not started by the benchmark / (wall s x cores)",
            "medians": f"over the runs with foreign_cpu_share <= {args.max_foreign} (all runs if none)"},
        "summary": summary, "targets": targets(summary), "runs": runs, "total_seconds": time.time() - t_all}
    print()
    print(table(summary))
    for name in (k for k in summary if k.startswith("calls")):
        s = summary[name]
        print(f"{name}: {s['per_prompt_s']:.3f}s/prompt = "
              + " + ".join(f"{k} {v:.3f}" for k, v in s["parts_s_per_prompt"].items())
              + f"  (UNet: {s['unet_calls_per_prompt']:.0f} calls/prompt of batch {s['unet_batch']})")
    noisy = [k for k, s in summary.items() if not s["quiet_runs"]]
    if noisy:
        print(f"warning: other processes used more than {args.max_foreign:.0%} of the CPUs during every run of "
              f"{', '.join(noisy)}: their figures are not comparable (see 'others' CPU')")
    print("targets:", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["targets"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}  ({result['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
