"""Benchmark of the pool job: object-store bytes and generator memory at the paper's shapes, throughput.

Three parts, side by side in one run (``--parts``):

* ``bytes``  -- at N = 20, 704x1024 (latents 4x128x88, as SD1.5's), on a tiny model of SD1.5's
  architecture built by the benchmark (VAE scale factor 8): the pool job on a local Ray, and the
  bytes Ray created in its object store during the job (the raylet's ``cumulative_created_bytes``,
  summed over nodes) per prompt, against the bytes per prompt of the pool's parquet parts.
* ``memory`` -- the same model and shapes: one prompt's row (``pool_builder.RowMaker.make``: sampler,
  chunked VAE decode, PickScore, ranking) in a fresh process per ``vae_batch`` (1, 4, 20); peak RSS
  during the call over the RSS before it (after loading).
* ``speed``  -- the embedded default model: ``loop`` (``build_pool(local=True)``, the plain
  single-process path, in a fresh process with torch's default threads), ``job1`` (one generator
  actor, ``generator_cpus=2``: two torch threads), ``job2`` (two actors, one thread each), and
  ``calls@T``: the model calls alone (UNet, VAE decode, text encoder, PickScore), warm, timed by
  wrapping the modules inside a ``RowMaker``. Steady images/s from the parts' mtimes.

    HGDPO_HOME=/tmp/hgh .venv/bin/python benchmarks/bench_pool.py          # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_pool.py --parts bytes,memory          # ~3 min
    .venv/bin/python benchmarks/bench_pool.py --parts speed --prompts 16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, when run as a script
from measure import (
    LoadMonitor,
    describe,
    machine,
    median,
    peak_memory,
    ratio,
    save,
    timed_method,
    wait_quiet,
)
from synthetic import SD15_704x1024 as PAPER
from synthetic import tiny_sd15

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pool.json"
MIB = 2**20


def make_prompts(n: int) -> list[str]:
    colors, shapes = ("red", "blue", "green", "yellow", "purple", "orange"), ("circle", "square", "triangle")
    return [f"a {colors[i % 6]} {shapes[(i // 6) % 3]} at the {('left', 'right', 'top')[i % 3]}, #{i}"
            for i in range(n)]


def pool_config(args, work: Path, name: str, **overrides):
    """The PoolConfig of a run: the benchmark's prompts and settings, written to ``work/name``."""
    from hgdpo.pool.config import PoolConfig

    settings = {"prompts": str(work / "prompts.txt"), "output": str(work / name), "images_per_prompt": args.images,
                "steps": args.steps, "seed": 0, "dtype": "float32", "rows_per_file": args.rows_per_file}
    return PoolConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------
# Bytes through the object store


def object_store_created() -> int:
    """Bytes Ray has created in its object store so far, all nodes (the raylet's own counter)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return int(get_memory_info_reply(state).store_stats.cumulative_created_bytes)


def part_bytes(folder: Path) -> dict:
    """Bytes on disk of the pool's parts, per column (compressed), and rows."""
    import pyarrow.parquet as pq

    out = {"file": 0, "rows": 0, "columns": {}}
    for path in sorted(folder.glob("part-*.parquet")):
        meta = pq.read_metadata(path)
        out["file"] += path.stat().st_size
        out["rows"] += meta.num_rows
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                out["columns"][name] = out["columns"].get(name, 0) + col.total_compressed_size
    return out


def run_bytes(args, work: Path, model: Path) -> dict:
    from hgdpo.pool.build import build_pool

    cfg = pool_config(args, work, "bytes", model=str(model), max_prompts=args.bytes_prompts, steps=2,
                      generator_cpus=2, **PAPER)
    before = object_store_created()
    build_pool(cfg, log=lambda *_: None, mlflow=False)
    created = object_store_created() - before
    disk = part_bytes(Path(cfg.output))
    n, rows = cfg.images_per_prompt, disk["rows"]
    raw_image = cfg.width * cfg.height * 3
    latents = n * 4 * (cfg.height // 8) * (cfg.width // 8) * 2
    png = (disk["columns"]["image_w"] + disk["columns"]["image_l"]) / (2 * rows)
    return {"prompts": rows, "object_store_bytes_per_prompt": created / rows,
            "row_bytes_per_prompt": disk["file"] / rows,
            "ratio": created / disk["file"],
            "expected_per_prompt": {"latents_float16": latents, "pixels_winner_loser": 2 * raw_image},
            "row_columns_per_prompt": {k: v / rows for k, v in disk["columns"].items()},
            "png_share_of_raw": png / raw_image,
            "all_images_per_prompt": n * raw_image,
            "scorer_stage_inputs_per_prompt": n * 3 * 224 * 224 * 2}


# ---------------------------------------------------------------------------------------------
# Peak memory of one prompt's row, in a fresh process per vae_batch


def memory_child(args, work: Path, model: Path, vae_batch: int) -> dict:
    from hgdpo.config.core import to_dict
    from hgdpo.pool.generator import RowMaker

    cfg = pool_config(args, work, "memory", model=str(model), steps=2, vae_batch=vae_batch, **PAPER)
    maker = RowMaker(to_dict(cfg), actor=False, log=lambda *_: None)
    m = peak_memory(lambda: maker.make("p0", 0, make_prompts(1)[0]))
    return {"vae_batch": vae_batch, "rss_before": m["rss_before"], "peak": m["peak"], "growth": m["growth"],
            "peak_reset": m["peak"] is not None}


def run_memory(args, work: Path, model: Path) -> dict:
    out = {}
    for k in args.vae_batches:
        # glibc hands big buffers back when freed, so RSS follows live memory, not its free lists
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out[k] = child(args, work, ["--child", "memory", "--child-model", str(model), "--child-vae-batch", str(k)],
                       env)
    return out


# ---------------------------------------------------------------------------------------------
# Throughput on the embedded default


def part_times(folder: Path) -> list[tuple[float, int]]:
    """(mtime, rows) of each part, oldest first: parts are written aside and renamed whole."""
    import pyarrow.parquet as pq

    return sorted((p.stat().st_mtime_ns / 1e9, pq.read_metadata(p).num_rows) for p in folder.glob("part-*.parquet"))


def steady_rate(parts: list[tuple[float, int]]) -> float | None:
    """Rows per second once running: the least-squares slope of rows done against time over the parts
    after the first (whose time holds loading, actor start and warm-up)."""
    points, done = [], parts[0][1]
    for t, rows in parts[1:]:
        done += rows
        points.append((t, done))
    if len(points) < 2:
        return None
    mt, mr = statistics.mean(t for t, _ in points), statistics.mean(r for _, r in points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (r - mr) for t, r in points) / var if var > 0 else None


def figures(args, start: float, folder: Path) -> dict:
    parts = part_times(folder)
    rows = sum(r for _, r in parts)
    if rows != args.prompts:
        raise RuntimeError(f"{folder}: expected {args.prompts} rows, found {rows}")
    seconds = parts[-1][0] - start
    rate = steady_rate(parts)
    return {"seconds": seconds, "images_per_s": rows * args.images / seconds, "parts": len(parts),
            "steady_images_per_s": rate and rate * args.images, "steady_s_per_prompt": rate and 1 / rate}


def loop_child(args, work: Path, name: str) -> dict:
    from hgdpo.pool.build import build_pool

    build_pool(pool_config(args, work, name), log=lambda *_: None, mlflow=False, local=True)
    return {}


def run_loop(args, work: Path, name: str) -> dict:
    start = time.time()
    child(args, work, ["--child", "loop", "--child-name", name])
    return figures(args, start, work / name)


def run_job(args, work: Path, name: str, actors: int, cpus: float) -> dict:
    from hgdpo.pool.build import build_pool

    cfg = pool_config(args, work, name, generator_actors=actors, generator_cpus=cpus)
    start, before = time.time(), object_store_created()
    build_pool(cfg, log=lambda *_: None, mlflow=False)
    out = figures(args, start, work / name)
    out["object_store_bytes_per_prompt"] = (object_store_created() - before) / args.prompts
    return out


def calls_child(args, work: Path, threads: int) -> dict:
    """Per prompt, warm: the seconds of the model calls alone, and of the whole ``make``."""
    import torch

    from hgdpo.config.core import to_dict
    from hgdpo.pool.generator import RowMaker

    torch.set_num_threads(threads)
    maker = RowMaker(to_dict(pool_config(args, work, "calls")), actor=False, log=lambda *_: None)
    prompts = make_prompts(args.calls_prompts + 1)
    maker.make("warm", 0, prompts[0])
    spent: dict[str, float] = {}

    def add(label: str, seconds: float) -> None:
        spent[label] = spent.get(label, 0.0) + seconds

    for obj, method, label in ((maker.pipe.unet, "forward", "unet"), (maker.pipe.vae, "decode", "vae"),
                               (maker.pipe.text_encoder, "forward", "text_encoder"),
                               (maker.scorer.model, "get_image_features", "pickscore"),
                               (maker.scorer.model, "get_text_features", "pickscore")):
        timed_method(obj, method, add, label)
    t0 = time.perf_counter()
    for i, text in enumerate(prompts[1:]):
        maker.make(f"p{i}", i, text)
    p = args.calls_prompts
    return {"threads": threads, "make_s_per_prompt": (time.perf_counter() - t0) / p,
            "calls_s_per_prompt": sum(spent.values()) / p, "by_call_s_per_prompt": {k: v / p for k, v in spent.items()}}


def overheads(speed: dict) -> dict:
    """Steady seconds per prompt of each variant over those of its model calls, minus 1: the loop and
    job1 against calls@2 (two threads, one prompt at a time), job2 against calls@1 / 2 (two one-thread
    actors, each a prompt at a time)."""
    calls = {t: median([r["calls_s_per_prompt"] for r in speed.get(f"calls@{t}", [])]) for t in (1, 2)}
    out = {}
    for name, base in (("loop", calls[2]), ("job1", calls[2]), ("job2", calls[1] and calls[1] / 2)):
        steady = median([r["steady_s_per_prompt"] for r in speed.get(name, [])])
        out[name] = None if steady is None or not base else steady / base - 1
    return out


def run_speed(args, work: Path) -> dict:
    runs: dict[str, list[dict]] = {}
    variants = {"loop": lambda n: run_loop(args, work, n), "job1": lambda n: run_job(args, work, n, 1, 2.0),
                "job2": lambda n: run_job(args, work, n, 2, 1.0)}
    for rep in range(args.repeats):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            runs.setdefault(name, []).append(measured(args, f"[{rep}] {name}", variants[name], f"{name}-{rep}"))
        for t in (2, 1):
            runs.setdefault(f"calls@{t}", []).append(measured(
                args, f"[{rep}] calls@{t}", child, args, work, ["--child", "calls", "--child-threads", str(t)]))
    return runs


def measured(args, label: str, fn, *a) -> dict:
    quiet = wait_quiet(args.wait_quiet, args.max_foreign) if args.wait_quiet > 0 else None
    with LoadMonitor() as mon:
        r = fn(*a)
    r.update(foreign_cpu_share=mon.foreign_share, foreign_share_before=quiet)
    shown = {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}
    print(f"{label}: {shown}", flush=True)
    return r


def child(args, work: Path, extra: list[str], env: dict | None = None) -> dict:
    """Run this script in a fresh process (``--child ...``); its result comes back as JSON."""
    result = work / f"child-{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "--workdir", str(work), "--child-out", str(result), *args.shared, *extra]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------
# Report


def summarize(res: dict) -> dict:
    s: dict = {}
    if "bytes" in res:
        b = res["bytes"]
        s["bytes_ratio"] = b["ratio"]
    if "memory" in res:
        mem = {int(k): v["growth"] for k, v in res["memory"].items()}
        s["memory_growth_mib"] = {k: v / MIB for k, v in mem.items()}
        s["memory_falls_with_vae_batch"] = all(mem[a] > mem[b] for a, b in zip(sorted(mem)[1:], sorted(mem)))
    if "speed" in res:
        sp = res["speed"]
        steady = {k: median([r.get("steady_images_per_s") for r in v]) for k, v in sp.items() if not k.startswith("calls")}
        e2e = {k: median([r["images_per_s"] for r in v]) for k, v in sp.items() if not k.startswith("calls")}
        s.update(steady_images_per_s=steady, images_per_s=e2e,
                 steady_vs_loop={k: ratio(v, steady.get("loop")) for k, v in steady.items()},
                 e2e_vs_loop={k: ratio(v, e2e.get("loop")) for k, v in e2e.items()},
                 steady_overhead_vs_calls=overheads(sp),
                 foreign_cpu_share={k: max(r["foreign_cpu_share"] for r in v) for k, v in sp.items()})
    return s


def targets(s: dict) -> dict:
    t = {}
    if "bytes_ratio" in s:
        t["object store bytes <= 1.5x row bytes"] = s["bytes_ratio"] <= 1.5
    if "memory_falls_with_vae_batch" in s:
        t["generator peak falls as vae_batch falls"] = s["memory_falls_with_vae_batch"]
    if "steady_vs_loop" in s:
        v, o = s["steady_vs_loop"], s["steady_overhead_vs_calls"]
        t["job1 >= 0.95x loop (steady)"] = (v.get("job1") or 0) >= 0.95
        t["job2 >= 1.0x loop (steady)"] = (v.get("job2") or 0) >= 1.0
        t["job1 overhead over calls < 10% (steady)"] = o.get("job1") is not None and o["job1"] < 0.10
    return t


def report(res: dict, s: dict) -> str:
    lines = []
    if "bytes" in res:
        b = res["bytes"]
        lines.append(f"bytes at N={PAPER['images_per_prompt']}, {PAPER['width']}x{PAPER['height']}, {b['prompts']} "
                     f"prompts: object store {b['object_store_bytes_per_prompt'] / 1e6:.2f} MB/prompt, row on disk "
                     f"{b['row_bytes_per_prompt'] / 1e6:.2f} MB/prompt: {b['ratio']:.2f}x "
                     f"(the tiny model's PNGs are {b['png_share_of_raw']:.0%} of raw pixels)")
    if "memory" in res:
        m = res["memory"]
        lines.append("generator peak over RSS before, one prompt at N=20, 704x1024: " + ", ".join(
            f"vae_batch {k}: {v['growth'] / MIB:.0f} MiB" for k, v in m.items()))
    if "steady_vs_loop" in s:
        lines.append("| variant | e2e img/s | steady img/s | steady x loop | e2e x loop | steady overhead over calls "
                     "| others' CPU |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for k in s["steady_images_per_s"]:
            lines.append(f"| {k} | {s['images_per_s'][k]:.2f} | {fmt(s['steady_images_per_s'][k])} | "
                         f"{fmt(s['steady_vs_loop'][k], 'x')} | {fmt(s['e2e_vs_loop'][k], 'x')} | "
                         f"{fmt(s['steady_overhead_vs_calls'].get(k), '%')} | {s['foreign_cpu_share'][k]:.0%} |")
        for name in ("calls@2", "calls@1"):
            rs = res["speed"].get(name, [])
            if rs:
                by = {k: median([r["by_call_s_per_prompt"][k] for r in rs]) for k in rs[0]["by_call_s_per_prompt"]}
                lines.append(f"{name}: {median([r['calls_s_per_prompt'] for r in rs]):.3f} s/prompt of calls ("
                             + ", ".join(f"{k} {v:.3f}" for k, v in by.items())
                             + f"), make() {median([r['make_s_per_prompt'] for r in rs]):.3f} s/prompt")
    return "\n".join(lines)


def fmt(v, kind: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if kind == "x" else f"{100 * v:+.1f}%" if kind == "%" else f"{v:.2f}"


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="bytes,memory,speed", help="comma list of bytes, memory, speed")
    p.add_argument("--prompts", type=int, default=32, help="speed: prompts per run")
    p.add_argument("--images", type=int, default=8, help="speed: N images per prompt")
    p.add_argument("--steps", type=int, default=20, help="speed: sampler steps")
    p.add_argument("--rows-per-file", type=int, default=4, help="prompts per part (the steady rate needs several)")
    p.add_argument("--repeats", type=int, default=2, help="speed: runs of each variant, interleaved")
    p.add_argument("--calls-prompts", type=int, default=6, help="speed: prompts timed per calls@T run")
    p.add_argument("--bytes-prompts", type=int, default=3, help="bytes: prompts of the N=20, 704x1024 job")
    p.add_argument("--vae-batches", default="1,4,20", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--ray-cpus", type=int, default=3,
                   help="num_cpus of the local Ray (logical: job1's 2-CPU actor plus its 0.5-CPU writers)")
    p.add_argument("--wait-quiet", type=float, default=30.0, help="wait up to this many s for a quiet machine")
    p.add_argument("--max-foreign", type=float, default=0.1, help="others' CPU share that still counts as quiet")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    p.add_argument("--workdir", default=None, help="where models and pools are written (default: a temporary one)")
    for name in ("child", "child-out", "child-name", "child-model", "child-vae-batch", "child-threads"):
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shared = [f"--prompts={args.prompts}", f"--images={args.images}", f"--steps={args.steps}",
                   f"--rows-per-file={args.rows_per_file}", f"--calls-prompts={args.calls_prompts}"]
    return args


def run_child(args) -> int:
    from hgdpo.infra.quiet import quiet_libraries

    quiet_libraries()
    work = Path(args.workdir)
    if args.child == "memory":
        out = memory_child(args, work, Path(args.child_model), int(args.child_vae_batch))
    elif args.child == "loop":
        out = loop_child(args, work, args.child_name)
    else:
        out = calls_child(args, work, int(args.child_threads))
    Path(args.child_out).write_text(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return run_child(args)
    import ray
    import torch

    from hgdpo.infra.quiet import quiet_libraries
    from hgdpo.models import embedded

    quiet_libraries()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pool-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.txt").write_text("\n".join(make_prompts(args.prompts)) + "\n")
    embedded.pipeline_dir(), embedded.scorer_dir()  # built once, before any timing
    model = tiny_sd15(work / "tiny-sd15") if {"bytes", "memory"} & set(parts) else None
    mach = machine(torch=torch.__version__, ray=ray.__version__, diffusers=__import__("diffusers").__version__)
    print(f"bench_pool: {describe(mach)}; parts {parts}", flush=True)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HGDPO_")}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    res: dict = {}
    t0 = time.time()
    try:
        if "bytes" in parts:
            res["bytes"] = measured(args, "bytes", run_bytes, args, work, model)
        if "memory" in parts:
            res["memory"] = run_memory(args, work, model)
        if "speed" in parts:
            res["speed"] = run_speed(args, work)
    finally:
        ray.shutdown()
    s = summarize(res)
    print("\n" + report(res, s))
    t = targets(s)
    print("targets: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in t.items()))
    save(Path(args.out), {"machine": mach, "settings": {k: v for k, v in vars(args).items() if k != "shared"},
                          "results": res, "summary": s, "targets": t, "seconds": time.time() - t0})
    print(f"results: {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
