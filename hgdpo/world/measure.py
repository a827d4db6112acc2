"""Figures of the miniature world's models, on held-out prompts no model was trained on.

    python -m hgdpo.world.measure [--world DIR] [--prompts 200] [--samples 4] [--out figures.json]

* the tailored model's mean judge score (one sample per prompt): it must leave room to improve;
* the world's PickScore against the judge: on pairs of the tailored model's own samples for the
  same prompt, how often PickScore prefers the image the judge prefers (the paper's Fig. 5a
  question: does the AI feedback agree with the "human"?). The judge's score is exp(-ln 3 * V)
  for its violation V (unmet constraints), so orderings are compared on V, and pairs within
  0.1 of a constraint of each other are left out as ties;
* how much the text moves an image: the mean pixel distance between a sample and the sample of a
  one-attribute mutation of its caption from the same seed, over the distance between two seeds'
  samples of the same caption, overall and by the kind of mutation. Near 0: the seed alone fixes
  the image and the text is hardly read, so preference pairs (which differ by seed) carry little a
  model could learn about the text;
* a grid of held-out captions with samples, for people to look at (``--grid grid.png``);
* load time of the pipeline and scorer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from hgdpo.infra.quiet import quiet_libraries
from hgdpo.models import loading as models
from hgdpo.models.sampling import generate, image_seeds, set_sampler
from hgdpo.report.pictures import captioned_grid
from hgdpo.scorers.pickscore import pickscore
from hgdpo.world.judge import judge_details
from hgdpo.world.mutate import mutate_caption, mutation_options
from hgdpo.world.prompts import make_prompts
from hgdpo.world.scene import parse_caption


def sample_world(pipeline: str, captions: list[str], samples: int, steps: int = 20, guidance: float = 5.0,
                 seed: int = 0) -> np.ndarray:
    """``samples`` images per caption from the pipeline, (P, S, H, W, 3) uint8."""
    pipe = models.load_pipeline(pipeline)
    set_sampler(pipe, "dpm_multistep")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i, caption in enumerate(captions):
        _, images = generate(pipe, caption, image_seeds(seed, f"measure-{i}", samples), steps=steps,
                             guidance_scale=guidance, width=side, height=side)
        out.append(images)
    return np.stack(out)


def agreement(scores_ai: np.ndarray, scores_judge: np.ndarray, tie: float = 0.05) -> tuple[float, int]:
    """Fraction of within-prompt pairs where the AI feedback orders the images as the judge does.

    Both arrays are (prompts, samples), higher is better; pairs the judge rates within ``tie``
    of each other are skipped.
    """
    agree = total = 0
    for ai, human in zip(scores_ai, scores_judge):
        for a, b in itertools.combinations(range(len(ai)), 2):
            if abs(human[a] - human[b]) <= tie:
                continue
            total += 1
            agree += (ai[a] > ai[b]) == (human[a] > human[b])
    return (agree / total if total else float("nan")), total


def text_sensitivity(pipeline: str, captions: list[str], images: np.ndarray, seed: int = 0, steps: int = 20) -> dict:
    """Distance ratio of a caption's mutation (same seed) to another seed (same caption), overall and by kind.

    ``images`` are ``sample_world(pipeline, captions, samples >= 2)``; the mutated captions are sampled
    with the first seed of each caption, which ``sample_world`` derives from the caption's index alone.
    """
    rng = np.random.default_rng(seed)
    kinds = []
    for caption in captions:
        options = sorted(mutation_options(parse_caption(caption)))
        kinds.append(options[rng.integers(len(options))])
    mutated = [mutate_caption(c, rng, kind) for c, kind in zip(captions, kinds)]
    moved = sample_world(pipeline, mutated, 1, steps=steps, seed=seed)[:, 0].astype(np.float32)
    first, second = images[:, 0].astype(np.float32), images[:, 1].astype(np.float32)
    by_text = np.abs(first - moved).mean(axis=(1, 2, 3))
    by_seed = np.abs(first - second).mean(axis=(1, 2, 3))
    out = {"all": float(by_text.mean() / by_seed.mean())}
    for kind in sorted(set(kinds)):
        mask = np.array([k == kind for k in kinds])
        out[kind] = float(by_text[mask].mean() / by_seed[mask].mean())
    return out


def measure(pipeline: str = "embedded", scorer: str = "embedded", n_prompts: int = 200, samples: int = 4,
            grid: str | None = None) -> dict:
    captions = make_prompts(n_prompts, "test")
    t = time.perf_counter()
    models.load_pipeline(pipeline)
    processor, clip = models.load_scorer(scorer)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    images = sample_world(pipeline, captions, samples)
    sample_s = time.perf_counter() - t
    details = [[judge_details(img, c) for img in imgs] for c, imgs in zip(captions, images)]
    judged = np.asarray([[d.score for d in row] for row in details])
    violation = np.asarray([[d.violation for d in row] for row in details])
    picked = np.stack([pickscore(processor, clip, c, imgs) for c, imgs in zip(captions, images)])
    agree, pairs = agreement(picked, -violation, tie=0.1)
    figures = {
        "held_out_prompts": n_prompts,
        "samples_per_prompt": samples,
        "tailored_judge_mean": float(judged[:, 0].mean()),
        "tailored_judge_mean_all_samples": float(judged.mean()),
        "tailored_judge_best_of_n_mean": float(judged.max(axis=1).mean()),
        "tailored_violation_mean": float(violation.mean()),
        "pickscore_judge_agreement": agree,
        "agreement_pairs": pairs,
        "pickscore_top1_judge_mean": float(judged[np.arange(len(judged)), picked.argmax(1)].mean()),
        "text_vs_seed_distance": text_sensitivity(pipeline, captions, images) if samples >= 2 else None,
        "load_seconds": load_s,
        "sample_seconds": sample_s,
    }
    if grid:

        captioned_grid([(c, list(imgs)) for c, imgs in zip(captions[:12], images[:12])]).save(grid)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="embedded")
    parser.add_argument("--scorer", default="embedded")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--grid", help="write a picture of held-out captions and samples here")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    quiet_libraries()
    torch.manual_seed(0)
    figures = measure(args.pipeline, args.scorer, args.prompts, args.samples, args.grid)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
