"""How good a rater is the miniature-world judge?  Prints figures on held-out test prompts.

For each test prompt c (``make_prompts(n, "test")``) and a hard negative m = mutate_caption(c)
(exactly one attribute changed):

- *own*      judge(render(c), c): an image that is right;
- *mutated*  judge(render(m), c): an image that is right for m, so wrong in one attribute for c;
- *swapped*  judge(render(c), m): the same pair seen from the caption side.

Each is measured on clean renders and on renders degraded as a weak diffusion model would
(gaussian blur, colour cast, pixel noise, and once a smooth warp; see render.degrade) at
four settings, plus judge
and render throughput.  Run:  python -m hgdpo.world.measure_judge [--n 500] [--size 64]
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import numpy as np

from hgdpo.world.judge import judge_batch
from hgdpo.world.mutate import MUTATION_KINDS
from hgdpo.world.prompts import make_pairs, make_prompts
from hgdpo.world.render import degrade, render_captions
from hgdpo.world.scene import parse_caption

#: name -> (blur sigma, noise std, colour-cast std, warp amplitude); blur and warp are in pixels
#: at 64 px and scale with the image size.
DEGRADATIONS = {
    "clean": (0.0, 0.0, 0.0, 0.0),
    "mild (blur 0.7, noise 8)": (0.7, 8.0, 6.0, 0.0),
    "weak model (blur 1.0, noise 12)": (1.0, 12.0, 8.0, 0.0),
    "strong (blur 1.5, noise 20)": (1.5, 20.0, 10.0, 0.0),
    "wobbly (warp 1.0, blur 0.7, n. 8)": (0.7, 8.0, 6.0, 1.0),
}


def _kind(orig: str, mut: str) -> str:
    a, b = parse_caption(orig), parse_caption(mut)
    if a.relations != b.relations:
        return "relation"
    for x, y in zip(a.objects, b.objects):
        for k in ("color", "shape", "size", "position"):
            if getattr(x, k) != getattr(y, k):
                return k
    return "?"


def measure(n: int = 500, size: int = 64, seed: int = 0) -> dict:
    """All figures as a dict (see ``main`` for what they are)."""
    prompts = make_prompts(n, "test", seed=seed)
    pairs = make_pairs(prompts, seed=seed)
    muts = [m for _, m in pairs]
    kinds = np.array([_kind(c, m) for c, m in pairs])

    t0 = time.perf_counter()
    own_imgs, _ = render_captions(prompts, size, seed=seed + 1)
    render_s = time.perf_counter() - t0
    mut_imgs, _ = render_captions(muts, size, seed=seed + 2)

    out: dict = {"n": n, "size": size, "levels": {}}
    judge_time, judged = 0.0, 0
    for name, (blur, noise, cast, warp) in DEGRADATIONS.items():
        rng = np.random.default_rng([seed, 77])
        if blur or noise or cast or warp:
            a = degrade(own_imgs, rng, blur * size / 64, noise, cast, warp * size / 64)
            b = degrade(mut_imgs, rng, blur * size / 64, noise, cast, warp * size / 64)
        else:
            a, b = own_imgs, mut_imgs
        t0 = time.perf_counter()
        own = judge_batch(a, prompts)
        judge_time += time.perf_counter() - t0
        judged += len(prompts)
        mutated = judge_batch(b, prompts)
        swapped = judge_batch(a, muts)
        per_kind = {
            k: (int((kinds == k).sum()), float(own[kinds == k].mean()), float(mutated[kinds == k].mean()))
            for k in MUTATION_KINDS
            if (kinds == k).any()
        }
        out["levels"][name] = {
            "own_mean": float(own.mean()),
            "own_min": float(own.min()),
            "own_p05": float(np.percentile(own, 5)),
            "mutated_mean": float(mutated.mean()),
            "swapped_mean": float(swapped.mean()),
            "gap": float(own.mean() - mutated.mean()),
            "own_gt_mutated": float((own > mutated).mean()),
            "own_gt_swapped": float((own > swapped).mean()),
            "per_kind": per_kind,
        }
    out["judge_images_per_s"] = judged / judge_time
    out["render_images_per_s"] = n / render_s
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="number of held-out test prompts")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    r = measure(args.n, args.size, args.seed)
    print(f"miniature-world judge on {r['n']} held-out test prompts, {r['size']}x{r['size']} renders")
    print("own = judge(render(c), c); mutated = judge(render(m), c); swapped = judge(render(c), m);")
    print("m = c with one attribute changed.\n")
    hdr = f"{'images':34s} {'own':>6s} {'own p5':>7s} {'own min':>8s} {'mutated':>8s} {'swapped':>8s} {'gap':>6s} {'own>mut':>8s} {'own>swp':>8s}"
    print(hdr)
    for name, v in r["levels"].items():
        print(
            f"{name:34s} {v['own_mean']:6.3f} {v['own_p05']:7.3f} {v['own_min']:8.3f} {v['mutated_mean']:8.3f}"
            f" {v['swapped_mean']:8.3f} {v['gap']:6.3f} {v['own_gt_mutated']:8.1%} {v['own_gt_swapped']:8.1%}"
        )
    print("\nmean own / mutated by kind of mutation:")
    kinds = list(next(iter(r["levels"].values()))["per_kind"])
    print(f"{'images':34s} " + " ".join(f"{k:>17s}" for k in kinds))
    for name, v in r["levels"].items():
        cells = [f"{v['per_kind'][k][1]:.2f}/{v['per_kind'][k][2]:.2f} (n={v['per_kind'][k][0]})" for k in kinds]
        print(f"{name:34s} " + " ".join(f"{c:>17s}" for c in cells))
    print(f"\njudge: {r['judge_images_per_s']:.0f} images/s; render: {r['render_images_per_s']:.0f} images/s (one CPU core)")
    return r


if __name__ == "__main__":
    main()
