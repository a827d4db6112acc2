"""Import throughput: pairs/s of a Pick-a-Pic import with the embedded VAE, against the VAE encode alone.

    .venv/bin/python benchmarks/bench_import.py                                # ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_import.py --pairs 256 --source-size 512  # Pick-a-Pic-sized sources
    .venv/bin/python benchmarks/bench_import.py --help

One process, ``--threads`` torch threads (1 by default, as an encoder actor with ``encoder_cpus: 1``;
fewer threads also suffer less from others' use of a shared machine), measured side by side,
``--repeats`` times, the order reversed every other repeat:

* ``encode``: the VAE encode alone (``hgdpo.interchange.encoding.encode``) of the same 2 x ``--pairs`` images,
  already decoded and fitted, ``--encode-batch`` at a time, after one warm-up call;
* ``import``: ``import_pairs(local=True)`` of a Pick-a-Pic parquet file of those pairs (world renders of
  ``--source-size`` px as JPEG) into a fresh output: per part, its row groups' images read, decoded,
  scaled and centre-cropped, encoded, and the part written (reading and writing in threads beside the
  encode, as the job does: the import may use a second core). Its steady time is the part loop's
  (``ImportResult.seconds``: the VAE loaded before it); the first pass over the small columns and the
  loading are given apart.

Figures: pairs/s of each, their ratio, the import's overhead over the encode alone (the issue's target:
under 15%), and the import's time by phase. Results go to ``--out`` (default
``benchmarks/results/import.json``; do not commit them).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import LoadMonitor, describe, machine, median, save  # noqa: E402


def write_source(path: Path, pairs: int, size: int, row_group: int) -> list[bytes]:
    """A Pick-a-Pic parquet file of ``pairs`` pairs of world renders (JPEG, ``size`` px); returns the images."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from hgdpo.world.prompts import make_prompts
    from hgdpo.world.render import render_captions

    captions = make_prompts(pairs, "train", seed=3)
    images, _ = render_captions([c for c in captions for _ in range(2)], size=64, seed=5, color_jitter=True)
    encoded = []
    for image in images:
        out = io.BytesIO()
        picture = Image.fromarray(image)
        if size != 64:
            picture = picture.resize((size, size), Image.Resampling.BICUBIC)
        picture.save(out, format="JPEG", quality=90)
        encoded.append(out.getvalue())
    rows = [{"caption": c, "jpg_0": encoded[2 * i], "jpg_1": encoded[2 * i + 1], "label_0": float(i % 2),
             "label_1": float(1 - i % 2), "has_label": True, "are_different": True, "model_0": "a", "model_1": "b",
             "ranking_id": i, "user_id": 0} for i, c in enumerate(captions)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group)
    return encoded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--source-size", type=int, default=64, help="px of the source images (the model's: 64)")
    parser.add_argument("--rows-per-file", type=int, default=32)
    parser.add_argument("--encode-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both variants (1: as an encoder actor with encoder_cpus=1)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "import.json"))
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from hgdpo.infra.quiet import quiet_libraries
    from hgdpo.interchange.config import ImportConfig
    from hgdpo.interchange.encoding import encode, fit, load_vae
    from hgdpo.interchange.import_job import import_pairs

    quiet_libraries()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-import-"))
    source = tmp / "train-00000-of-00001.parquet"
    images = write_source(source, args.pairs, args.source_size, row_group=args.rows_per_file)
    vae = load_vae(ImportConfig(source=str(source), output=str(tmp / "unused")), torch.float32, "cpu")
    pixels = np.stack([fit(Image.open(io.BytesIO(b)), 64, 64) for b in images])
    encode(vae, pixels[: args.encode_batch], args.encode_batch)  # warm-up

    runs: dict[str, list[dict]] = {"encode": [], "import": []}
    for r in range(args.repeats):
        order = ["encode", "import"] if r % 2 == 0 else ["import", "encode"]
        for variant in order:
            with LoadMonitor() as load:
                if variant == "encode":
                    t0 = time.perf_counter()
                    encode(vae, pixels, args.encode_batch)
                    run = {"seconds": time.perf_counter() - t0}
                else:
                    cfg = ImportConfig(source=str(source), output=str(tmp / f"out-{r}"),
                                       rows_per_file=args.rows_per_file, encode_batch=args.encode_batch)
                    t0 = time.perf_counter()
                    result = import_pairs(cfg, local=True, log=lambda *_: None)
                    wall = time.perf_counter() - t0
                    run = {"seconds": result.seconds, "wall": wall, "phases": result.timings}
            run.update(pairs_per_s=args.pairs / run["seconds"], others_cpu=load.foreign_share)
            runs[variant].append(run)
            print(f"repeat {r} {variant}: {run['pairs_per_s']:.1f} pairs/s (others' CPU {load.foreign_share:.0%})")

    enc = median([x["pairs_per_s"] for x in runs["encode"]])
    imp = median([x["pairs_per_s"] for x in runs["import"]])
    phases = {k: median([x["phases"][k] for x in runs["import"]]) for k in runs["import"][0]["phases"]}
    first_pass = median([x["wall"] - x["seconds"] for x in runs["import"]])
    figures = {"encode_pairs_per_s": enc, "import_pairs_per_s": imp, "ratio": imp / enc,
               "overhead_pct": 100 * (enc / imp - 1), "phases_seconds": phases, "first_pass_and_loading_s": first_pass,
               "others_cpu_max": max(x["others_cpu"] for v in runs.values() for x in v)}
    m = machine(torch=torch.__version__)
    save(Path(args.out), {"machine": m, "args": vars(args), "runs": runs, "figures": figures})
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{describe(m)}; {args.pairs} pairs, sources {args.source_size} px, "
          f"torch threads {torch.get_num_threads()}")
    print("| variant | pairs/s | x encode alone |\n|---|---:|---:|")
    print(f"| VAE encode alone | {enc:.1f} | 1.00x |\n| import (steady) | {imp:.1f} | {imp / enc:.2f}x |")
    print(f"import overhead over the encode alone: {figures['overhead_pct']:+.1f}%; import phases (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + f"; first pass + VAE load {first_pass:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
