"""Baseline B made once, for every evaluation that shares it (a sweep's trials: one B, many A's).

``build_baseline`` writes B's images and scores into a cache folder under a digest of everything
they depend on (``baseline_settings``, ``baseline_key``): ``rows.parquet`` (one row per prompt: seeds,
B's scores per scorer, colours, PNGs; in parts) and last ``baseline.json``, so a folder holding it is
complete. ``read_baseline`` gives an evaluation those rows, which then makes only A's images.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa

from hgdpo import prompts as prompt_io
from hgdpo.errors import HgdpoError
from hgdpo.evaluate.actors import generate_and_score
from hgdpo.evaluate.config import EvalConfig
from hgdpo.evaluate.eval_result import describe_side
from hgdpo.infra import storage, tracking
from hgdpo.models import lan
from hgdpo.models import loading as models

BASELINE_ROWS = "rows.parquet"  # one row per prompt: seeds, B's scores per scorer, colours, PNGs; in parts
BASELINE_INFO = "baseline.json"  # written last: a folder holding it is complete


def baseline_settings(cfg: EvalConfig, items: list[prompt_io.Prompt]) -> dict:
    """Everything B's images and scores depend on: B's model and adapter (by content as well as by
    name), its sampling settings, the seeds, the devices, the scorers and the test prompts."""
    side = cfg.side("b")
    source = models.resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    adapter = side["adapter"]
    return {
        "model": cfg.model, "model_config": cfg.model_config, "model_fingerprint": models.fingerprint(source),
        "adapter": adapter, "alpha": side["alpha"], "lan": side["lan"],
        "adapter_fingerprint": (lan.check_adapter(adapter, cfg.model, allow_pickle=cfg.allow_pickle).get("fingerprint")
                                if adapter is not None else None),
        **{k: getattr(cfg, k) for k in ("sampler", "steps", "guidance_scale", "width", "height", "negative_prompt",
                                        "dtype", "seed", "images_per_prompt")},
        "generator_gpu": cfg.generator_gpus > 0, "scorer_gpu": cfg.scorer_gpus > 0,  # the device of `auto`
        "scorers": {name: list(cfg.scorer_sources(name)) for name in cfg.scorers},
        "prompts": [[p.id, p.text] for p in items],
    }


def baseline_key(settings: dict) -> str:
    """The digest of ``baseline_settings``: the name of B's rows in a cache folder."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_baseline(cfg: EvalConfig, items: list[prompt_io.Prompt], cache: str, log=print) -> tuple[str, int]:
    """B's images scored by every scorer, into ``<cache>/<baseline_key>`` unless that holds them already.

    Returns the folder and the number of images made (0 when found). The caller has checked ``cfg``
    (``prepare``); A's side is neither checked nor generated. Run it once, before the evaluations that
    read it: two builders of one folder would each make every image (the last write wins, whole).
    """
    settings = baseline_settings(cfg, items)
    location = storage.join(cache, baseline_key(settings))
    if storage.is_file(storage.join(location, BASELINE_INFO)):
        log(f"evaluate: baseline B's images and scores for these settings are in {location}")
        return location, 0
    log(f"evaluate: baseline B ({describe_side(cfg, 'b')}) on {len(items)} prompts x {cfg.images_per_prompt} "
        f"seed(s), once for every evaluation that shares it, into {location}")
    start = time.perf_counter()
    rows = sorted(generate_and_score(cfg, items, log, sides=("b",)), key=lambda r: int(r["prompt_index"]))

    def part(chunk: list[dict]) -> pa.Table:
        return pa.table({
            "prompt_id": [str(r["prompt_id"]) for r in chunk], "seeds": [r["seeds"].tolist() for r in chunk],
            **{f"score_b_{name}": [r[f"score_b_{name}"].tolist() for r in chunk] for name in cfg.scorers},
            "hsv_b": [r["hsv_b"].tolist() for r in chunk], "png_b": [[bytes(p) for p in r["png_b"]] for r in chunk]})

    n = cfg.prompts_per_baseline_part()
    storage.write_parquet_parts(storage.join(location, BASELINE_ROWS),
                                (part(rows[i:i + n]) for i in range(0, len(rows), n)))
    images = sum(len(r["seeds"]) for r in rows)
    storage.write_json(storage.join(location, BASELINE_INFO), {
        "key": storage.name(location), "settings": settings, "prompts": len(rows),
        "images": images, "seconds": time.perf_counter() - start, "versions": tracking.versions()})
    return location, images


def read_baseline(cache: str, cfg: EvalConfig, items: list[prompt_io.Prompt]) -> tuple[str, dict[str, dict]] | None:
    """B's rows for ``cfg`` and ``items`` from a cache folder (``build_baseline``'s): (their folder,
    prompt id -> the row's B columns), or None when the cache does not hold them."""
    location = storage.join(cache, baseline_key(baseline_settings(cfg, items)))
    with storage.errors("baseline cache", location):
        if not storage.is_file(storage.join(location, BASELINE_INFO)):
            return None
        table = storage.read_parquet(storage.join(location, BASELINE_ROWS))
    rows = {}
    for r in table.to_pylist():
        rows[r["prompt_id"]] = {"seeds": np.asarray(r["seeds"], dtype=np.int64),
                                **{f"score_b_{n}": np.asarray(r[f"score_b_{n}"], dtype=np.float64) for n in cfg.scorers},
                                "hsv_b": np.asarray(r["hsv_b"], dtype=np.float64), "png_b": r["png_b"]}
    missing = [p.id for p in items if p.id not in rows]
    if missing:
        raise HgdpoError(f"baseline cache: {location} lacks prompts {', '.join(missing[:3])}; delete the folder "
                         f"to have it made again")
    return location, rows


