"""The miniature world's "public" preference set: out-of-distribution pairs for the paper's Table 1.

    python -m hgdpo.world.public_set --out runs/public/world-public.parquet --pairs 1000

A public set (Pick-a-Pic, HPDv2) holds pairs that other generators made for other people's prompts, of
which only a share show what the tailored model is for (the paper's "(H)" subsets: people). The
world's version, written as a Pick-a-Pic v2 parquet file so that it goes through the real importer:

* **Subject prompts** (``subject_share`` of the pairs, 0.35 by default: a setting, not a measured
  share of any public set): world captions of the train split, drawn with a seed of their own (so few
  are the pool's prompts). The world's subjects are its shapes, so the importer's ``subset: people``
  with ``people_keywords: [circle, square, triangle]`` gives the world's "(H)" subset.
* **Other prompts**: captions of things the world cannot draw ("a watercolor of a harbor at dusk"),
  as most of a public set is to a specialised model; their images are renders of random world scenes.
* **Another generator**: every image is a *render* (not a sample of the tailored UNet) of the caption or
  of a one-attribute mutation of it (``mutate_caption``), in a style of its own (blurred, noisy,
  colour-cast and warped, ``render.degrade``), so its mistakes are not the tailored model's.
* **Labels**: the world's PickScore of each image under the stored caption; the higher is labelled 1,
  equal scores are a tie (0.5 each: the importer drops them).

The file is written a row group at a time, atomically (``hgdpo.infra.storage``).
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from hgdpo.errors import HgdpoError, exit_status
from hgdpo.infra import storage
from hgdpo.infra.quiet import quiet_libraries
from hgdpo.models import embedded
from hgdpo.models.tokenizer import clip_tokenizer
from hgdpo.scorers.base import pooled
from hgdpo.scorers.pickscore import preference_scores
from hgdpo.world.prompts import make_prompts, mutate_caption
from hgdpo.world.render import degrade, render_captions

THINGS = ("a watercolor of a harbor", "a photo of a mountain lake", "an oil painting of a forest", "a vintage car",
          "a pencil sketch of a cathedral", "a close-up of a sunflower", "a bowl of ramen", "a lighthouse",
          "a cup of coffee on a desk", "a dragon made of clouds", "a steam train on a bridge", "a field of tulips")
WHEN = ("at dusk", "in the snow", "in autumn", "at noon", "in the fog", "under a starry sky")
def torch_no_grad(fn):
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return run


STYLE = {"blur": 1.4, "noise": 10.0, "color_shift": 18.0, "warp": 1.5}  # the other generator's look


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def load_pickscore():
    """The world's PickScore as (tokenizer, image processor, CLIP model). The tokenizer is the real CLIP
    tokenizer built from the packaged BPE (``hgdpo.models.tokenizer``), the one its processor folder holds: built
    this way in about 2 s, where ``AutoProcessor`` converts it to a fast tokenizer in 15 s or more."""
    from transformers import CLIPImageProcessor, CLIPModel

    folder = str(embedded.scorer_dir())
    return clip_tokenizer(), CLIPImageProcessor.from_pretrained(folder), CLIPModel.from_pretrained(folder).eval()


@torch_no_grad
def score_pairs(tokenizer, image_processor, scorer, captions: list[str], images: np.ndarray) -> np.ndarray:
    """PickScore (eq. 5) of each pair's two images under its caption, the batch in one call per tower:
    ``images`` (2m, H, W, 3) uint8 -> (m, 2)."""
    text = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    text_emb = pooled(scorer.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
    pixels = image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    image_emb = pooled(scorer.get_image_features(pixel_values=pixels))
    return np.stack([preference_scores(text_emb[k: k + 1], image_emb[2 * k: 2 * k + 2], scorer.logit_scale).numpy()
                     for k in range(len(captions))])


def make_rows(pairs: int, subject_share: float = 0.35, seed: int = 0, batch: int = 64):
    """The set's rows, ``batch`` at a time (lists of Pick-a-Pic v2 records)."""
    rng = np.random.default_rng([seed, 14])
    subjects = iter(make_prompts(pairs, "train", seed=1000 + seed))
    scenes = make_prompts(max(16, pairs // 4), "train", seed=2000 + seed)
    tokenizer, image_processor, scorer = load_pickscore()
    for start in range(0, pairs, batch):
        captions, drawn, kinds = [], [], []
        for _ in range(start, min(start + batch, pairs)):
            subject = bool(rng.random() < subject_share)
            if subject:
                caption = next(subjects)
                both = [caption, mutate_caption(caption, rng)]
            else:
                caption = f"{THINGS[rng.integers(len(THINGS))]} {WHEN[rng.integers(len(WHEN))]}"
                both = [scenes[int(k)] for k in rng.integers(len(scenes), size=2)]
            captions.append(caption)
            drawn += [both[k] for k in rng.permutation(2)]
            kinds.append(subject)
        images, _ = render_captions(drawn, seed=int(rng.integers(1 << 31)), color_jitter=True)
        images = degrade(images, rng, **STYLE)
        scores = score_pairs(tokenizer, image_processor, scorer, captions, images)
        rows = []
        for k, (caption, subject) in enumerate(zip(captions, kinds)):
            i = start + k
            label_0 = 0.5 if scores[k, 0] == scores[k, 1] else float(scores[k, 0] > scores[k, 1])
            rows.append({"are_different": True, "best_image_uid": "", "caption": caption,
                         "created_at": 0, "has_label": True, "image_0_uid": f"{i}-0", "image_0_url": "",
                         "image_1_uid": f"{i}-1", "image_1_url": "", "jpg_0": _jpeg(images[2 * k]),
                         "jpg_1": _jpeg(images[2 * k + 1]), "label_0": label_0, "label_1": 1.0 - label_0,
                         "model_0": "world-renderer", "model_1": "world-renderer", "num_example_per_prompt": 1,
                         "ranking_id": i, "user_id": 0, "subject": subject})
        yield rows


def write_public_set(out: str, pairs: int, subject_share: float = 0.35, seed: int = 0, log=print) -> dict:
    """Write the set as one Pick-a-Pic v2 parquet file at ``out``; returns its counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if pairs < 1 or not 0 <= subject_share <= 1:
        raise HgdpoError(f"public set: pairs must be at least 1 and subject_share in [0, 1] (got {pairs}, "
                         f"{subject_share})")
    counts = {"pairs": 0, "subject": 0, "ties": 0}

    def fill(stream) -> None:
        writer = None
        for rows in make_rows(pairs, subject_share, seed):
            table = pa.Table.from_pylist(rows)
            writer = writer or pq.ParquetWriter(stream, table.schema, compression="zstd")
            writer.write_table(table)
            counts["pairs"] += len(rows)
            counts["subject"] += sum(r["subject"] for r in rows)
            counts["ties"] += sum(r["label_0"] == 0.5 for r in rows)
        writer.close()

    storage.write(storage.absolute(out), fill)
    log(f"public set: {counts['pairs']} pairs ({counts['subject']} of world subjects, {counts['ties']} ties) -> {out}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the parquet file to write (a path or a storage URI)")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--subject-share", type=float, default=0.35, help="share of pairs with world captions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    quiet_libraries()
    return exit_status(lambda: write_public_set(args.out, args.pairs, args.subject_share, args.seed))


if __name__ == "__main__":
    sys.exit(main())
