"""Prompt sets for the miniature world: disjoint train / test captions, and hard negatives.

``make_prompts(n, split, seed)`` draws captions from the grammar (scene.sample_spec) and keeps
those whose split is ``split``.  The split of a caption is fixed by a hash of its *canonical
key* (scene.canonical_key), so:

- it does not depend on n, the seed or the order of drawing: train and test never share a
  caption, for any sizes;
- paraphrases land on the same side ("a red circle and a blue square" / "a blue square and a
  red circle", "A above B" / "B below A"), so no test prompt is a reworded train prompt;
- prompts are deduplicated by canonical key, and ``make_prompts(n)`` is a prefix of
  ``make_prompts(m)`` for m > n (same split and seed).

About 20 % of the caption space is test (``TEST_FRACTION``).  ``write_prompts`` writes a .txt
file, one caption per line, readable by hgdpo.prompts.

``mutate_caption`` (from scene.py, re-exported) changes exactly one attribute of a caption: the
hard negatives used to measure the judge, and available for preference-pair construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from hgdpo.prompts import stable_hash
from hgdpo.world.mutate import mutate_caption
from hgdpo.world.scene import canonical_key, caption_of_spec, sample_spec

__all__ = ["TEST_FRACTION", "split_of", "make_prompts", "write_prompts", "mutate_caption", "make_pairs"]

TEST_FRACTION = 0.2
_SPLITS = ("train", "test")
_BUCKETS = 1000


def split_of(caption: str) -> str:
    """"train" or "test": the split a caption belongs to (stable across runs and machines)."""
    bucket = stable_hash("hgdpo-world-split:" + canonical_key(caption)) % _BUCKETS
    return "test" if bucket < TEST_FRACTION * _BUCKETS else "train"


def make_prompts(n: int, split: str = "train", seed: int = 0, max_draws: Optional[int] = None) -> list[str]:
    """``n`` distinct captions of the given split, deterministic in (n, split, seed).

    Raises ValueError for a bad split and RuntimeError if ``n`` distinct captions cannot be
    found within ``max_draws`` draws (default ``200 * n + 10000``).  The grammar has 20,979
    captions up to paraphrase (324 single-object, 1,215 "and" pairs, 4,860 relation pairs,
    14,580 triples), so about 16,800 train and 4,200 test.  Because of deduplication, large n
    exhaust the small forms first: 500 test prompts hold ~57 of the ~65 single-object test
    captions, and later prompts are almost all pairs and triples.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = np.random.default_rng([int(seed), _SPLITS.index(split), 0x57A1D])
    out: list[str] = []
    seen: set[str] = set()
    limit = max_draws if max_draws is not None else 200 * n + 10000
    draws = 0
    while len(out) < n:
        if draws >= limit:
            raise RuntimeError(f"found only {len(out)} distinct {split} captions in {draws} draws")
        draws += 1
        text = caption_of_spec(sample_spec(rng))
        key = canonical_key(text)
        if key in seen or split_of(text) != split:
            continue
        seen.add(key)
        out.append(text)
    return out


def write_prompts(path: str | Path, n: int, split: str = "train", seed: int = 0) -> list[str]:
    """Write ``make_prompts(n, split, seed)`` to ``path`` (UTF-8, one caption per line) and
    return them.  Parent directories are created."""
    prompts = make_prompts(n, split, seed)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(c + "\n" for c in prompts), encoding="utf-8")
    return prompts


def make_pairs(captions: list[str], seed: int = 0) -> list[tuple[str, str]]:
    """``(caption, mutate_caption(caption))`` for each caption, deterministic in the seed."""
    rng = np.random.default_rng([int(seed), 0x3E6])
    return [(c, mutate_caption(c, rng)) for c in captions]
