"""Part ``scale`` of bench_train.py: the training job's memory against the pool's size.

Synthetic pools (``synthetic.write_pool``: N = 20 float16 latents of 4 x 128 x 88 per prompt, as
SD1.5 at 704x1024) of each size R, and ``jobs/train.py`` on each for the same fixed number of steps
with a tiny UNet of SD1.5's architecture that takes those latents (``synthetic.tiny_sd15``). Each job
runs in a fresh process with its own local Ray (``RAY_TMPDIR`` in the run's folder), while this
process samples every ``interval`` s:

* the PSS (``/proc/<pid>/smaps_rollup``: shared pages split among their users, so the processes'
  figures add up) of the job's driver and of each Ray Train worker (``RayTrainWorker`` in its title);
* the bytes in use in that Ray's object store (the raylet's store stats, through its GCS).

With ``--baseline REV`` the same runs are made from a checkout of REV (a git worktree; its Ray
workers get it first on ``PYTHONPATH``), side by side: today's code against REV's. pairs/s is the
job's own MLflow metric (the first report, warm-up, left out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from measure import median
from synthetic import tiny_sd15, write_pool

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def worktree(work: Path, rev: str) -> Path:
    """A checkout of ``rev`` (kept in ``work`` and reused)."""
    dst = work / f"src-{rev[:12]}"
    if not dst.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(dst), rev], check=True,
                       capture_output=True)
    return dst


def _pss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gcs_address(ray_tmp: Path) -> str | None:
    import ray

    ports = list((ray_tmp / "ray" / "session_latest").glob("gcs_server_port_*"))
    return f"{ray.util.get_node_ip_address()}:{ports[0].read_text().strip()}" if ports else None


def _store_used(address: str) -> int | None:
    try:
        from ray._private.internal_api import (
            get_memory_info_reply,
            get_state_from_address,
        )

        return int(get_memory_info_reply(get_state_from_address(address)).store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - the cluster is starting or already gone: no figure this time
        return None


class Sampler:
    """Peak PSS of a driver and of each training worker, and peak object-store use, sampled in a thread."""

    def __init__(self, driver: int, ray_tmp: Path, interval: float = 0.5):
        self.driver, self.ray_tmp, self.interval = driver, ray_tmp, interval
        self.peak_driver, self.peak_workers, self.peak_store = 0, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, address: str | None) -> None:
        import psutil

        self.peak_driver = max(self.peak_driver, _pss(self.driver) or 0)
        for p in psutil.process_iter(["pid", "cmdline"]):
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and str(self.ray_tmp) in str(self._env_tmp(p)):
                self.peak_workers[p.pid] = max(self.peak_workers.get(p.pid, 0), _pss(p.pid) or 0)
        if address:
            self.peak_store = max(self.peak_store, _store_used(address) or 0)

    @staticmethod
    def _env_tmp(p) -> str:
        import psutil

        try:
            return p.environ().get("RAY_TMPDIR", "")
        except psutil.Error:
            return ""

    def _run(self) -> None:
        address = None
        while not self._stop.wait(self.interval):
            address = address or _gcs_address(self.ray_tmp)
            self._sample(address)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def run_job(args, src: Path, pool_dir: Path, model: Path, out: Path) -> dict:
    """``jobs/train.py`` from ``src`` on ``pool_dir`` in a fresh process, sampled; its figures."""
    import mlflow

    out.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="hgs", dir="/tmp"))  # short: Ray puts unix sockets under it
    uri = f"sqlite:///{out / 'mlflow.db'}"
    argv = [f"pool={pool_dir}", f"output={out / 'train'}", f"model={model}", "objective=hgdpo",
            f"max_steps={args.scale_steps}", f"global_batch={args.job_global_batch}",
            f"micro_batch={args.job_micro_batch}", f"data_shards={args.job_data_shards}", "workers=2",
            "cpus_per_worker=1", f"metrics_every={args.metrics_every}", f"checkpoint_every={args.scale_steps}",
            f"mlflow_uri={uri}", "mlflow_experiment=bench-scale"]
    # The job's Ray without token auth, so that this process can read its store stats (as the tests' clusters).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(src), RAY_DATA_LOG_LEVEL="WARNING")
    start = time.perf_counter()
    with open(out / "job.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(src / "jobs" / "train.py"), *argv], cwd=src, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        with Sampler(proc.pid, ray_tmp) as s:
            rc = proc.wait()
    wall = time.perf_counter() - start
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc:
        sys.exit(f"{src}/jobs/train.py failed with {rc}; see {out / 'job.log'}")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("bench-scale").experiment_id])[0]
    hist = sorted(client.get_metric_history(run.info.run_id, "pairs_per_s"), key=lambda m: m.step)
    return {"wall_s": wall, "pairs_per_s": median([m.value for m in hist[1:]]),
            "driver_pss_peak": s.peak_driver, "worker_pss_peaks": sorted(s.peak_workers.values()),
            "object_store_peak": s.peak_store}


def run_scale(args, work: Path) -> dict:
    """Every pool size, today's code and (with ``--baseline``) REV's, interleaved by size."""
    from hgdpo.models import embedded

    model = tiny_sd15(work / "tiny-sd15")
    sizes = [int(r) for r in args.scale_rows.split(",")]
    prompts = work / "scale-prompts.txt"
    prompts.write_text("".join(f"a photo of subject {i}, scene {i % 97}\n" for i in range(max(sizes))))
    embedded.pipeline_dir(), embedded.scorer_dir()
    sources = {"today": ROOT} | ({"baseline": worktree(work, args.baseline)} if args.baseline else {})
    res: dict = {"sizes": sizes, "runs": {}}
    for rows in sizes:
        for name, src in sources.items():
            if name == "baseline" and rows not in [int(r) for r in args.baseline_rows.split(",")]:
                continue
            t = time.perf_counter()  # the baseline reads the earlier pool format: the same rows, written in it
            pool_dir = write_pool(work / (f"pool-{rows}" + ("-v1" if name == "baseline" else "")), prompts, model, rows,
                                  format_1=name == "baseline")
            print(f"  {name}: pool of {rows} prompts ready ({time.perf_counter() - t:.0f} s)", flush=True)
            out = work / f"scale-{name}-{rows}-{time.time_ns()}"
            r = run_job(args, src, pool_dir, model, out)
            res["runs"][f"{name}@{rows}"] = r
            print(f"  {name} R={rows}: {r['pairs_per_s']:.2f} pairs/s, driver PSS {r['driver_pss_peak'] / MIB:.0f} MiB, "
                  f"workers {[round(w / MIB) for w in r['worker_pss_peaks']]} MiB, object store "
                  f"{r['object_store_peak'] / MIB:.0f} MiB, wall {r['wall_s']:.0f} s", flush=True)
    return res


def summarize(res: dict) -> dict:
    """Growth of each peak from the smallest pool to the largest, per source, and pairs/s against the baseline."""
    sizes, runs = res["sizes"], res["runs"]
    lo, hi = min(sizes), max(sizes)
    out = {}
    for name in ("today", "baseline"):
        a, b = runs.get(f"{name}@{lo}"), runs.get(f"{name}@{hi}")
        if a and b:
            out[f"{name}_growth_{lo}_to_{hi}"] = {
                "driver_pss": b["driver_pss_peak"] / a["driver_pss_peak"] - 1,
                "worker_pss_max": max(b["worker_pss_peaks"]) / max(a["worker_pss_peaks"]) - 1,
                "object_store": (b["object_store_peak"] / a["object_store_peak"] - 1) if a["object_store_peak"] else None}
    if f"baseline@{lo}" in runs:
        out[f"pairs_per_s_today_over_baseline_at_{lo}"] = runs[f"today@{lo}"]["pairs_per_s"] / runs[f"baseline@{lo}"][
            "pairs_per_s"]
    return out


def table(res: dict, s: dict) -> str:
    lines = ["(d) scale: peaks per pool size R (MiB; PSS; two workers)",
             "| run | pairs/s | driver PSS | worker PSS (each) | object store |", "|---|---:|---:|---:|---:|"]
    for name, r in res["runs"].items():
        lines.append(f"| {name} | {r['pairs_per_s']:.2f} | {r['driver_pss_peak'] / MIB:.0f} | "
                     f"{', '.join(str(round(w / MIB)) for w in r['worker_pss_peaks'])} | {r['object_store_peak'] / MIB:.0f} |")
    lines.append(json.dumps(s, indent=1))
    return "\n".join(lines)
