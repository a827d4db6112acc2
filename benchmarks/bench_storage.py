"""Benchmark of hgdpo's atomic write against writing straight to the final name, for a pool part.

What it measures: the cost of ``hgdpo.infra.storage.write`` (through ``write_parquet``, exactly the call
``hgdpo.pool.store.write_part`` makes): the part is written to ``.tmp-<uuid>-<name>`` in the same folder,
then moved onto its name with ``fs.move`` -- a rename on a local disk, a server-side ``CopyObject`` +
``DeleteObject`` on S3 -- against writing the same table straight to its final name:

* ``atomic`` -- ``hgdpo.infra.storage.write_parquet(location, table, compression="zstd")``;
* ``direct`` -- ``fs, path = hgdpo.infra.storage.resolve(location)``, then
  ``with fs.open_output_stream(path) as out: pq.write_table(table, out, compression="zstd")``.

The data is one synthetic pool part at the paper's SD1.5 scale, built once with
``hgdpo.pool.store.to_table`` before any timing: ``--rows`` prompts (default 64, the pool's
``rows_per_file``), each with ``latents`` of shape (20, 4, 128, 88) float16 (N = 20 images at
704x1024, ``keep: all``; standard-normal values, like SD latents), random seeds, scores and ranks,
and two ~300 KB blobs of random bytes standing in for the PNGs ``image_w`` / ``image_l``.
Random data barely compresses, so the file is about as large as the table.

Two stores: a local temporary folder (``--local-dir`` to choose the disk), and an S3-compatible
server the benchmark starts itself (``moto_server`` on 127.0.0.1, a free port, one bucket) and
stops at the end, also on error. Per repeat, every store runs both variants, each to a fresh name,
the order reversed every other repeat. Two more timings, in neither variant: after the ``direct``
write, its file is moved to a new name with ``fs.move`` alone (*move ms*: the bare cost the atomic
write adds), and once per repeat the same ``pq.write_table`` goes into memory (the encoding alone,
no store). One untimed warm-up write per store comes first. Every timed file is
checked (present, its size, no temporary left behind) and deleted outside the timings; one file
per store is read back and compared with the table.

    .venv/bin/python benchmarks/bench_storage.py                     # defaults: ~2-3 min on 2 cores
    .venv/bin/python benchmarks/bench_storage.py --rows 8 --repeats 3 --out /tmp/s.json
    .venv/bin/python benchmarks/bench_storage.py --local-dir /mnt/disk/tmp   # the local store elsewhere

Prints the machine and a Markdown table of medians (and the ratio atomic / direct per store);
writes everything, every single timing included, as JSON to ``--out`` (default
``benchmarks/results/storage.json``; do not commit it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

# This file runs as a script: its own folder goes on the path for the shared helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import busy_seconds, machine, median, save

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "storage.json"
BIN = Path(sys.executable).parent
LATENT_SHAPE = (20, 4, 128, 88)  # N = 20 images, SD1.5 latents of 704x1024 (keep: all)
PNG_BYTES = 300_000
BUCKET = "bench-storage"
MB = 1e6
VARIANTS = ("atomic", "direct")


# ---------------------------------------------------------------------------------------------
# The machine and its CPU


def this_machine() -> dict:
    """``measure.machine`` with the versions of the libraries a write goes through."""
    import boto3
    import moto
    import numpy
    import pyarrow

    return dict(machine(pyarrow=pyarrow.__version__, numpy=numpy.__version__, moto=moto.__version__,
                        boto3=boto3.__version__), processor=platform.processor())


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (ext4, tmpfs, overlay...), from /proc/mounts."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3:
                mount = fields[1].replace("\\040", " ")
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, kind = mount, fields[2]
    return kind


def self_cpu() -> float:
    """CPU seconds of this process, all threads (pyarrow's I/O and S3 threads included)."""
    t = os.times()
    return t.user + t.system


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process ``pid`` used so far; 0 if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


# ---------------------------------------------------------------------------------------------
# Data


def make_rows(rows: int, seed: int = 0) -> dict:
    """A column batch of ``rows`` prompts in the pool's layout, random values at the real shapes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = LATENT_SHAPE[0]
    latents = np.empty((rows, *LATENT_SHAPE), dtype=np.float16)
    for i in range(rows):  # one row at a time: no float32 copy of the whole part
        latents[i] = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    scores = rng.normal(21.0, 1.0, (rows, n)).astype(np.float32)
    rank = np.argsort(-scores, axis=1, kind="stable").astype(np.int32)
    prompts = [f"a photo of a synthetic subject number {i}, highly detailed" for i in range(rows)]

    def png() -> bytes:  # PNG signature + random bytes: incompressible, like a PNG's deflate stream
        return b"\x89PNG\r\n\x1a\n" + rng.bytes(int(rng.integers(PNG_BYTES - 10_000, PNG_BYTES + 10_000)) - 8)

    return {
        "prompt_id": [hashlib.sha1(p.encode()).hexdigest()[:16] for p in prompts],
        "prompt_index": list(range(rows)),
        "prompt": prompts,
        "seeds": list(rng.integers(0, 2**31 - 1, (rows, n), dtype=np.int64)),
        "scores": list(scores),
        "rank": list(rank),
        "winner": [int(r[0]) for r in rank],
        "loser": [int(r[-1]) for r in rank],
        "latent_index": [list(range(n))] * rows,
        "latents": latents,
        "image_w": [png() for _ in range(rows)],
        "image_l": [png() for _ in range(rows)],
    }


# ---------------------------------------------------------------------------------------------
# The S3-compatible server


class MotoServer:
    """``moto_server`` on 127.0.0.1 in its own session (so stopping it stops only what it started)."""

    def __init__(self, workdir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "moto.log"
        spool = workdir / "moto-tmp"  # where moto spools large objects: removed with the workdir
        spool.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["TMPDIR"] = str(spool)
        exe = BIN / "moto_server"
        if not exe.exists():
            exe = Path(shutil.which("moto_server") or exe)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=workdir)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not come up in 60 s:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, n: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)  # its own process group: the server and its children only
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@contextlib.contextmanager
def s3_environment(endpoint: str):
    """The AWS_* environment pyarrow's and boto3's clients read, for this process; restored afterwards
    (other AWS_* settings of the caller -- a profile, a session token -- are set aside meanwhile)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench-storage-key",
                       "AWS_SECRET_ACCESS_KEY": "bench-storage-secret", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------------
# The variants


def write_atomic(location: str, table) -> None:
    from hgdpo.infra import storage

    storage.write_parquet(location, table, compression="zstd")  # what pool.write_part does


def write_direct(location: str, table) -> None:
    import pyarrow.parquet as pq

    from hgdpo.infra import storage

    fs, path = storage.resolve(location)
    with fs.open_output_stream(path) as out:
        pq.write_table(table, out, compression="zstd")


def encode_only(table) -> None:
    """The same ``pq.write_table`` into memory: the parquet encoding + zstd alone, no store at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(table, pa.BufferOutputStream(), compression="zstd")


WRITERS = {"atomic": write_atomic, "direct": write_direct}


def check_written(location: str) -> int:
    """The size of the file at ``location``; fails if it is missing or a temporary is left beside it."""
    import pyarrow.fs as pafs

    from hgdpo.infra import storage

    fs, path = storage.resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise RuntimeError(f"{location}: not written")
    folder = storage.parent(location)
    fs_dir, root = storage.resolve(folder)
    left = [i.path for i in fs_dir.get_file_info(pafs.FileSelector(root, allow_not_found=True))
            if i.base_name.startswith(storage.TMP_PREFIX)]
    if left:
        raise RuntimeError(f"{folder}: temporary files left behind: {left}")
    return info.size


def timed(server_pid: int | None, fn, *fn_args) -> dict:
    """Wall seconds of ``fn(*fn_args)``, the CPU seconds of this process and of the server (``server_pid``)
    meanwhile, and the CPU others used (every other process of the machine) as a share of wall x cores."""
    busy0, cpu0 = busy_seconds(), self_cpu()
    srv0 = server_cpu(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    fn(*fn_args)
    wall = time.perf_counter() - t0
    cpu = self_cpu() - cpu0
    srv = (server_cpu(server_pid) - srv0) if server_pid else 0.0
    others = busy_seconds() - busy0 - cpu - srv
    return {"wall_s": wall, "cpu_s": cpu, "server_cpu_s": srv if server_pid else None,
            "others_cpu_share": max(0.0, others) / (wall * (os.cpu_count() or 1))}


def run(args, table, stores: dict[str, tuple[str, int | None]]) -> dict:
    """Every timing: ``{store: {"atomic": [...], "direct": [...], "move": [...]}}``, and the encoding alone."""
    from hgdpo.infra import storage

    runs: dict = {store: {"atomic": [], "direct": [], "move": []} for store in stores}
    encode: list = []
    sizes: dict = {}
    for store, (root, pid) in stores.items():  # warm-up (untimed): clients, connections, first object
        loc = storage.join(root, f"warmup-{uuid.uuid4().hex[:8]}.parquet")
        write_atomic(loc, table)
        sizes[store] = check_written(loc)
        back = storage.read_parquet(loc)
        if not back.equals(table):
            raise RuntimeError(f"{store}: the part read back differs from the table written")
        del back
        storage.delete(loc)
        print(f"  {store}: warm-up write ok, read back equal ({sizes[store] / MB:.1f} MB)", flush=True)
    for rep in range(args.repeats):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        encode.append({"repeat": rep, **timed(None, encode_only, table)})
        print(f"  repeat {rep + 1}/{args.repeats}  encode into memory {encode[-1]['wall_s']:.3f}s", flush=True)
        for store, (root, pid) in stores.items():
            for variant in order:
                loc = storage.join(root, f"part-r{rep:02d}-{variant}-{uuid.uuid4().hex[:8]}.parquet")
                rec = timed(pid, WRITERS[variant], loc, table)
                size = check_written(loc)
                if size != sizes[store]:
                    raise RuntimeError(f"{loc}: {size} bytes, the warm-up wrote {sizes[store]}")
                runs[store][variant].append({"repeat": rep, **rec})
                if variant == "direct":  # the move alone, on a whole part: what the atomic write adds
                    fs, path = storage.resolve(loc)
                    moved = path + ".moved"
                    rec = timed(pid, fs.move, path, moved)
                    runs[store]["move"].append({"repeat": rep, **rec})
                    fs.delete_file(moved)
                else:
                    storage.delete(loc)
            line = "  ".join(f"{v} {runs[store][v][-1]['wall_s']:.3f}s" for v in (*order, "move"))
            print(f"  repeat {rep + 1}/{args.repeats}  {store:<6} {line}", flush=True)
    return {"runs": runs, "encode": encode, "file_bytes": sizes}


def summarize(runs: dict, file_bytes: dict) -> dict:
    out = {}
    for store, by in runs.items():
        med = {v: median(r["wall_s"] for r in by[v]) for v in (*VARIANTS, "move")}
        per_rep = [a["wall_s"] / d["wall_s"] for a, d in zip(by["atomic"], by["direct"])]
        out[store] = {
            "median_s": med,
            "min_s": {v: min(r["wall_s"] for r in by[v]) for v in (*VARIANTS, "move")},
            "ratio_atomic_direct": med["atomic"] / med["direct"],
            "median_per_repeat_ratio": median(per_rep),
            "extra_s": med["atomic"] - med["direct"],
            "direct_MB_per_s": file_bytes[store] / MB / med["direct"],
            "median_cpu_s": {v: median(r["cpu_s"] for r in by[v]) for v in (*VARIANTS, "move")},
            "median_others_cpu_share": median(r["others_cpu_share"] for v in VARIANTS for r in by[v]),
            "median_server_cpu_s": ({v: median(r["server_cpu_s"] for r in by[v])
                                     for v in (*VARIANTS, "move")} if by["atomic"][0]["server_cpu_s"] is not None
                                    else None),
        }
    return out


def table_md(summary: dict, file_bytes: dict) -> str:
    lines = ["| store | part MB | atomic s | direct s | atomic / direct | per-repeat ratio | extra s | move ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for store, s in summary.items():
        m = s["median_s"]
        lines.append(f"| {store} | {file_bytes[store] / MB:.1f} | {m['atomic']:.3f} | {m['direct']:.3f} | "
                     f"{s['ratio_atomic_direct']:.3f}x | {s['median_per_repeat_ratio']:.3f}x | {s['extra_s']:+.3f} | "
                     f"{m['move'] * 1e3:.3f} |")
    lines += ["", "| store | CPU s atomic | CPU s direct | server CPU s atomic | server CPU s direct | others' CPU |",
              "|---|---:|---:|---:|---:|---:|"]
    for store, s in summary.items():
        c, srv = s["median_cpu_s"], s["median_server_cpu_s"]
        lines.append(f"| {store} | {c['atomic']:.2f} | {c['direct']:.2f} | "
                     f"{'-' if srv is None else format(srv['atomic'], '.2f')} | "
                     f"{'-' if srv is None else format(srv['direct'], '.2f')} | "
                     f"{s['median_others_cpu_share']:.0%} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="prompts in the part (default 64: the pool's rows_per_file)")
    p.add_argument("--repeats", type=int, default=5, help="timed writes per variant and store (default 5)")
    p.add_argument("--local-dir", default=None,
                   help="folder in which the local store's temporary folder is made (default: $TMPDIR or /tmp)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON results file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        p.error("--rows and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    sys.path.insert(0, str(ROOT))
    import pyarrow.parquet  # noqa: F401  (imported before any timing)

    from hgdpo.pool import store as pool

    t_all = time.time()
    mach = this_machine()
    load_before = mach["loadavg"]
    print(f"bench_storage: {mach['cpu_model']}, {mach['cpu_count']} cores; pyarrow {mach['versions']['pyarrow']}, "
          f"moto {mach['versions']['moto']}", flush=True)

    t0 = time.perf_counter()
    table = pool.to_table(make_rows(args.rows), LATENT_SHAPE)
    build_s = time.perf_counter() - t0
    print(f"part: {args.rows} rows x latents {LATENT_SHAPE} float16 + 2 x ~{PNG_BYTES // 1000} KB blobs = "
          f"{table.nbytes / MB:.1f} MB in memory (built in {build_s:.1f}s)", flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    local_parent = Path(args.local_dir).expanduser() if args.local_dir else None
    if local_parent:
        local_parent.mkdir(parents=True, exist_ok=True)
    local_root = Path(tempfile.mkdtemp(prefix="bench-storage-local-", dir=local_parent))
    server = None
    result: dict = {}
    try:
        server = MotoServer(work)
        with s3_environment(server.endpoint):
            import boto3

            boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            stores = {"local": (str(local_root), None),
                      "s3": (f"s3://{BUCKET}/pool-{uuid.uuid4().hex[:8]}", server.proc.pid)}
            print(f"stores: local {local_root} ({filesystem_of(local_root)}); s3 moto_server at {server.endpoint}",
                  flush=True)
            measured = run(args, table, stores)
        summary = summarize(measured["runs"], measured["file_bytes"])
        encode_s = median(r["wall_s"] for r in measured["encode"])
        md = table_md(summary, measured["file_bytes"])
        result = {
            "benchmark": "bench_storage",
            "machine": mach,
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "settings": {"rows": args.rows, "repeats": args.repeats, "latent_shape": list(LATENT_SHAPE),
                         "png_bytes": PNG_BYTES, "compression": "zstd",
                         "local_dir": str(local_root), "local_filesystem": filesystem_of(local_root),
                         "s3": "moto_server on 127.0.0.1 (in-process Python server, same machine)"},
            "part": {"rows": table.num_rows, "table_MB": table.nbytes / MB,
                     "file_MB": {k: v / MB for k, v in measured["file_bytes"].items()}, "build_s": build_s},
            "definitions": {
                "atomic": "hgdpo.infra.storage.write_parquet(location, table, compression='zstd'): write "
                          ".tmp-<uuid>-<name>, then fs.move onto the name",
                "direct": "fs, path = hgdpo.infra.storage.resolve(location); fs.open_output_stream(path) + "
                          "pq.write_table(table, out, compression='zstd')",
                "move": "fs.move of the direct variant's file to a new name, timed on its own",
                "ratio_atomic_direct": "median atomic wall / median direct wall",
                "extra_s": "median atomic wall - median direct wall",
                "encode_s": "pq.write_table(table, pa.BufferOutputStream(), compression='zstd'): the encoding "
                            "alone, no store (median)",
                "cpu_s": "CPU seconds of the benchmark's process (all threads) during the write; server_cpu_s: "
                         "the moto server's",
                "others_cpu_share": "CPU used meanwhile by every other process of the machine / (wall x cores); "
                                    "wall figures of a busy machine are slower and noisier, the CPU seconds less so",
            },
            "summary": summary,
            "encode_s": encode_s,
            "runs": measured["runs"],
            "encode_runs": measured["encode"],
            "total_seconds": time.time() - t_all,
        }
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(local_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"machine: {mach['cpu_model']}, {mach['cpu_count']} cores; load average "
          f"{load_before[0]:.2f} before, {result['load_avg_after'][0]:.2f} after")
    print(f"part: {args.rows} rows, {result['part']['file_MB']['local']:.1f} MB on disk (zstd); "
          f"medians of {args.repeats} writes per variant")
    print()
    print(md)
    print()
    print(f"encoding alone (pq.write_table into memory, zstd): {encode_s:.3f} s median")
    print()
    save(args.out, result)
    print(f"results: {args.out}  ({result['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
