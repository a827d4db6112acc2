"""A pool ranked by the world's judge instead of its PickScore: what the method gives with perfect feedback.

    python -m hgdpo.world.oracle --pool runs/demo/pool --out runs/oracle-pool

The same prompts, seeds and latents as ``--pool`` (which must keep all N latents); every image is
decoded and judged, its score is minus its violation (unmet constraints), and the winner, the loser
and their pictures follow from that ranking. Training on both pools with the same settings
separates the two reasons a trained model can fail to please the judge: feedback that rewards
something else (the PickScore pool loses to the oracle pool) or a model and protocol that cannot
learn what the feedback asks (both do equally badly).
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np

from hgdpo.errors import HgdpoError
from hgdpo.infra import storage
from hgdpo.models import loading as models
from hgdpo.models.sampling import decode
from hgdpo.pool import store as pool
from hgdpo.pool.part_file import write_part_file
from hgdpo.scorers.base import rank
from hgdpo.world.judge import judge_details

SCORER = "world-judge"  # the scorer the oracle pool records in its metadata


def judge_scores(pipe, prompt: str, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's latents (K, C, h, w): their images and minus the judge's violation of each."""
    import torch

    images = decode(pipe, torch.from_numpy(latents.astype(np.float32)))
    return images, np.array([-judge_details(image, prompt).violation for image in images], dtype=np.float32)


def rerank(source: str, target: str, model: str = "embedded", log=print) -> int:
    """Write ``target``: the pool ``source`` ranked by the judge. Returns its rows."""
    meta = pool.read_meta(source, "--pool")
    if meta["config"].get("keep") != "all":
        raise HgdpoError(f"--pool: {source} keeps only the winner's and loser's latents (keep: "
                         f"{meta['config'].get('keep')}); the judge needs all N")
    if storage.exists(target) and storage.listdir(target):
        raise HgdpoError(f"--out: {target} is not empty; give a new folder")
    new = copy.deepcopy(meta)
    new["config"]["scorer_model"] = new["fingerprint"]["scorer_fingerprint"] = SCORER
    new["config"]["output"] = target
    new["ranked_from"] = source
    pool.init(target, new)
    pipe = models.load_pipeline(model)
    loser_rank = meta["fingerprint"]["loser_rank"]
    parts, files, rows = [], {}, 0
    for table in pool.read_parts(source, columns=None):
        latents = pool.latents_of(table)
        batch = {name: table.column(name).to_pylist() for name in
                 ("prompt_id", "prompt_index", "prompt", "seeds", "latent_index")}
        batch.update(scores=[], rank=[], winner=[], loser=[], image_w=[], image_l=[], latents=latents)
        for prompt, lat in zip(batch["prompt"], latents):
            images, scores = judge_scores(pipe, prompt, lat)
            order = rank(scores)
            w, lo = int(order[0]), int(order[loser_rank - 1])
            batch["scores"].append(scores)
            batch["rank"].append(order)
            batch["winner"].append(w)
            batch["loser"].append(lo)
            batch["image_w"].append(pool.png_bytes(images[w]))
            batch["image_l"].append(pool.png_bytes(images[lo]))
        name, entry = write_part_file(target, pool.to_table(batch, tuple(meta["latent_shape"])))
        parts.append(name)
        files[name] = entry
        rows += table.num_rows
        log(f"oracle: {rows}/{meta['num_prompts']} prompts ranked by the judge")
    pool.mark_complete(target, parts, rows, files)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="a finished pool that keeps all N latents")
    parser.add_argument("--out", required=True, help="a new folder or storage URI for the judge-ranked pool")
    parser.add_argument("--model", default="embedded", help="the pool's base model (its VAE decodes the latents)")
    args = parser.parse_args(argv)
    try:
        rows = rerank(args.pool, args.out, args.model)
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"oracle: {rows} prompts ranked by the judge into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
