"""Building a preference pool on Ray Data (paper §3.1, eq. 4-6).

The stream: prompts -> ``GenerateImages`` actors (N images per prompt as one batch, seeds from
(run seed, prompt id, j)) -> ``ScoreAndRank`` actors (PickScore, ranking, PNGs of the winner and
loser, the latents to keep) -> ``write_rows`` tasks (one atomic parquet part per batch), whose
small summaries flow back to the driver for progress and statistics. Nothing holds the pool
in memory; the driver sees only prompt ids and scores.

Resume: parts are whole or absent, so a rerun reads the prompt ids already written, builds only
the rest, and adds no duplicate. ``_COMPLETE.json`` is written when every prompt has a row.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hgdpo import models, pool, prompts as prompt_io, storage, tracking
from hgdpo.config import from_dict, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.pool_config import PoolConfig
from hgdpo.raycluster import ensure_ray, warn_if_not_shared


class GenerateImages:
    """Ray Data actor: loads the model once, then makes each prompt's N images as one batch."""

    def __init__(self, config: dict):
        from hgdpo.quiet import quiet_libraries
        from hgdpo.sampling import native_size, resolve_device_dtype, set_sampler, set_threads

        self.cfg = cfg = from_dict(PoolConfig, config)
        quiet_libraries()
        set_threads(cfg.generator_cpus)
        device, dtype = resolve_device_dtype(cfg.dtype)
        self.pipe = models.load_pipeline(cfg.model, model_config=cfg.model_config,
                                         allow_pickle=cfg.allow_pickle, dtype=dtype, device=device)
        set_sampler(self.pipe, cfg.sampler)
        native_w, native_h = native_size(self.pipe)
        self.width, self.height = cfg.width or native_w, cfg.height or native_h

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hgdpo.sampling import generate, image_seeds

        cfg, out = self.cfg, defaultdict(list)
        for pid, index, text in zip(batch["prompt_id"], batch["prompt_index"], batch["prompt"]):
            seeds = image_seeds(cfg.seed, str(pid), cfg.images_per_prompt)
            latents, images = generate(self.pipe, str(text), seeds, steps=cfg.steps,
                                       guidance_scale=cfg.guidance_scale, width=self.width,
                                       height=self.height, negative_prompt=cfg.negative_prompt)
            for key, value in (("prompt_id", pid), ("prompt_index", index), ("prompt", text),
                               ("seeds", np.asarray(seeds, dtype=np.int64)), ("latents", latents),
                               ("images", images)):
                out[key].append(value)
        return {k: np.stack(v) if k in ("seeds", "latents", "images") else np.asarray(v) for k, v in out.items()}


class ScoreAndRank:
    """Ray Data actor: PickScore for each prompt's N images, ranking, and what the pool keeps."""

    def __init__(self, config: dict):
        from hgdpo.quiet import quiet_libraries
        from hgdpo.sampling import resolve_device_dtype, set_threads

        self.cfg = cfg = from_dict(PoolConfig, config)
        quiet_libraries()
        set_threads(cfg.scorer_cpus)
        device, dtype = resolve_device_dtype(cfg.dtype)
        self.processor, self.model = models.load_scorer(cfg.scorer_model, cfg.scorer_processor,
                                                        allow_pickle=cfg.allow_pickle, dtype=dtype, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hgdpo.scoring import pickscore, rank

        loser_rank = self.cfg.resolved_loser_rank()
        out = defaultdict(list)
        for i, text in enumerate(batch["prompt"]):
            images, latents = batch["images"][i], batch["latents"][i]
            scores = pickscore(self.processor, self.model, str(text), images)
            order = rank(scores)
            w, l = int(order[0]), int(order[loser_rank - 1])
            keep = np.arange(len(scores), dtype=np.int32) if self.cfg.keep == "all" else np.asarray([w, l], np.int32)
            out["scores"].append(scores.astype(np.float32))
            out["rank"].append(order)
            out["winner"].append(w)
            out["loser"].append(l)
            out["latent_index"].append(keep)
            out["latents"].append(latents[keep])
            out["image_w"].append(pool.png_bytes(images[w]))
            out["image_l"].append(pool.png_bytes(images[l]))
        result = {k: batch[k] for k in ("prompt_id", "prompt_index", "prompt", "seeds")}
        for key, values in out.items():
            result[key] = np.array(values, dtype=object) if key.startswith("image_") else np.stack(values) \
                if key not in ("winner", "loser") else np.asarray(values, dtype=np.int32)
        return result


def write_rows(batch: dict[str, np.ndarray], output: str, latent_shape: list[int]) -> dict[str, np.ndarray]:
    """Ray Data task: write a batch of finished rows as one part; return a summary per row."""
    table = pool.to_table(batch, tuple(latent_shape))
    name = pool.write_part(output, table)
    scores = np.stack(batch["scores"])  # (B, N)
    rows = np.arange(len(scores))
    return {
        "prompt_id": np.asarray(batch["prompt_id"]),
        "part": np.asarray([name] * len(scores)),
        "score_w": scores[rows, batch["winner"]],
        "score_l": scores[rows, batch["loser"]],
        "score_mean": scores.mean(axis=1),
    }


@dataclass
class PoolResult:
    output: str
    total: int
    built: int  # prompts built by this run
    seconds: float
    images_per_prompt: int
    skipped: bool = False  # the pool was already complete
    score_w: list[float] = field(default_factory=list)
    score_l: list[float] = field(default_factory=list)
    score_mean: list[float] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return 0.0 if not self.seconds else self.built * self.images_per_prompt / self.seconds


def _latent_shape(cfg: PoolConfig, source: models.ModelSource) -> tuple[list[int], int, int]:
    """(K, C, h, w) of the kept latents, and the image width and height."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    base = source.location if source.kind != "file" else (cfg.model_config or models.SD15_HUB_CONFIG)
    try:
        unet = UNet2DConditionModel.load_config(base, subfolder="unet")
        vae = AutoencoderKL.load_config(base, subfolder="vae")
    except Exception as err:
        raise HgdpoError(f"model: cannot read the UNet/VAE configs of {base}: {err}") from None
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    width = cfg.width or unet["sample_size"] * factor
    height = cfg.height or unet["sample_size"] * factor
    if width % factor or height % factor:
        raise HgdpoError(f"pool.width/height: {width}x{height} must be multiples of the VAE factor {factor}")
    k = cfg.images_per_prompt if cfg.keep == "all" else 2
    return [k, unet["in_channels"], height // factor, width // factor], width, height


def _fingerprint_mismatch(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def prepare(cfg: PoolConfig, log=print, mlflow: bool = True) -> tuple[list[prompt_io.Prompt], dict]:
    """Everything checked before any work: output, MLflow store (unless the job records no run),
    prompts, model, scorer, sizes. Returns prompts and meta."""
    storage.check_writable(cfg.output, "pool.output")
    if mlflow:
        tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "pool.mlflow_uri")
    items = prompt_io.read_prompts(cfg.prompts, fmt=cfg.prompt_format, prompt_column=cfg.prompt_column,
                                   id_column=cfg.id_column, category=cfg.category, max_prompts=cfg.max_prompts)
    source = models.check_model(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    models.check_scorer(cfg.scorer_model, cfg.scorer_processor, allow_pickle=cfg.allow_pickle)
    tokenizer = models.load_tokenizer(cfg.model, model_config=cfg.model_config)
    long = prompt_io.overlong(items, tokenizer)
    if long:
        example, length = long[0]
        print(f"warning: {len(long)} prompt(s) are longer than the text encoder's 77 tokens and will be "
              f"truncated, e.g. {example.id!r} ({length} tokens): {example.text[:80]!r}...", file=sys.stderr)
    latent_shape, width, height = _latent_shape(cfg, source)
    scorer_id = cfg.scorer_model if cfg.scorer_model != "embedded" else \
        models.fingerprint(models.ModelSource("folder", str(models.embedded.scorer_dir()), "embedded"))
    settings = cfg.data_settings()
    settings["prompts"] = str(cfg.prompts)
    fingerprint = dict(settings, loser_rank=cfg.resolved_loser_rank(), prompts_digest=prompt_io.digest(items),
                       model_fingerprint=models.fingerprint(source), scorer_fingerprint=scorer_id,
                       width=width, height=height)
    meta = {
        "format": pool.FORMAT,
        "config": to_dict(cfg),
        "fingerprint": fingerprint,
        "versions": tracking.versions(),
        "num_prompts": len(items),
        "images_per_prompt": cfg.images_per_prompt,
        "latent_shape": latent_shape,
        "width": width,
        "height": height,
        "base_model": {"name": cfg.model, "fingerprint": fingerprint["model_fingerprint"]},
    }
    return items, meta


def build_pool(cfg: PoolConfig, log=print, mlflow: bool = True) -> PoolResult:
    """Build (or finish) the pool described by ``cfg``; log progress; return what was done. ``mlflow``:
    whether a run will be recorded (``record``), so the tracking store is checked first."""
    import ray

    items, meta = prepare(cfg, log, mlflow)
    warn_if_not_shared(cfg.output, "pool.output", log)
    st = pool.state(cfg.output)
    if st.meta is not None:
        diff = _fingerprint_mismatch(st.meta.get("fingerprint", {}), meta["fingerprint"])
        if diff:
            old, new = st.meta["fingerprint"], meta["fingerprint"]
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:4])
            raise HgdpoError(f"output: {cfg.output} holds a pool written with another config ({detail}); "
                             f"choose another output or rerun with the pool's config")
    if st.complete is not None:
        log(f"pool: {cfg.output} is already complete ({st.complete['rows']} prompts); nothing to do")
        return PoolResult(cfg.output, len(items), 0, 0.0, cfg.images_per_prompt, skipped=True)
    storage.probe_write(cfg.output, "pool.output")
    if st.meta is None:
        pool.init(cfg.output, meta)
    else:
        removed = pool.remove_temporaries(cfg.output)
        if removed:
            log(f"pool: removed {removed} half-written file(s) left by an interrupted run")
    done = pool.done_prompt_ids(cfg.output, st.parts)
    pending = [p for p in items if p.id not in done]
    log(f"pool: {len(items)} prompts, {len(done)} already built, {len(pending)} to build "
        f"({cfg.images_per_prompt} images each) -> {cfg.output}")

    result = PoolResult(cfg.output, len(items), 0, 0.0, cfg.images_per_prompt)
    start = time.perf_counter()
    if pending:
        ensure_ray()
        config = to_dict(cfg)
        ds = ray.data.from_items(
            [{"prompt_id": p.id, "prompt_index": p.index, "prompt": p.text} for p in pending],
            override_num_blocks=min(len(pending), max(8, 4 * cfg.generator_actors)))
        ds = ds.map_batches(GenerateImages, fn_constructor_kwargs={"config": config}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=cfg.generator_actors),
                            num_gpus=cfg.generator_gpus, num_cpus=cfg.generator_cpus, batch_format="numpy")
        ds = ds.map_batches(ScoreAndRank, fn_constructor_kwargs={"config": config}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=cfg.scorer_actors),
                            num_gpus=cfg.scorer_gpus, num_cpus=cfg.scorer_cpus, batch_format="numpy")
        ds = ds.map_batches(write_rows, fn_kwargs={"output": storage.absolute(cfg.output), "latent_shape": meta["latent_shape"]},
                            batch_size=cfg.rows_per_file, num_cpus=0, batch_format="numpy")
        last = 0.0
        for row in ds.iter_rows():
            result.built += 1
            result.score_w.append(float(row["score_w"]))
            result.score_l.append(float(row["score_l"]))
            result.score_mean.append(float(row["score_mean"]))
            now = time.perf_counter()
            if now - last > 5 or result.built == len(pending):
                last = now
                total_done = len(done) + result.built
                log(f"pool: {total_done}/{len(items)} prompts done "
                    f"({100 * total_done / len(items):.0f}%), {result.built * cfg.images_per_prompt / (now - start):.2f} images/s")
    result.seconds = time.perf_counter() - start

    st = pool.state(cfg.output)
    done = pool.done_prompt_ids(cfg.output, st.parts)
    missing = [p.id for p in items if p.id not in done]
    if missing:
        raise HgdpoError(f"pool: {len(missing)} prompts have no row after the run (first: {missing[0]!r}); rerun to finish")
    pool.mark_complete(cfg.output, st.parts, len(done))
    log(f"pool: complete, {len(done)} prompts in {len(st.parts)} files at {cfg.output}")
    return result


def record(cfg: PoolConfig, result, meta: dict) -> None:
    """One MLflow run per pool job: config, throughput, score statistics, a picture of pairs."""
    import mlflow

    from hgdpo.pictures import pairs_grid

    with tracking.run(cfg.mlflow_uri, cfg.mlflow_experiment, run_name=f"pool:{storage.name(cfg.output)}"):
        mlflow.log_params(tracking.flat_params(to_dict(cfg)))
        mlflow.set_tags({"stage": "pool", "output": cfg.output, **{f"version.{k}": v for k, v in meta["versions"].items()}})
        metrics = {"prompts_total": result.total, "prompts_built": result.built, "seconds": result.seconds,
                   "images_per_s": result.images_per_second}
        if result.built:
            gap = np.asarray(result.score_w) - np.asarray(result.score_l)
            metrics.update(score_winner_mean=float(np.mean(result.score_w)),
                           score_loser_mean=float(np.mean(result.score_l)),
                           score_mean=float(np.mean(result.score_mean)),
                           score_gap_mean=float(gap.mean()), score_gap_std=float(gap.std()),
                           score_gap_min=float(gap.min()))
        mlflow.log_metrics(metrics)
        table = pool.read(cfg.output, columns=["prompt", "image_w", "image_l", "prompt_index"]).slice(0, cfg.log_pairs)
        rows = [(r["prompt"], pool.png_image(r["image_w"]), pool.png_image(r["image_l"])) for r in table.to_pylist()]
        with tempfile.TemporaryDirectory() as tmp:
            pairs_grid(rows).save(Path(tmp) / "pairs.png")
            (Path(tmp) / "pool.json").write_text(json.dumps(meta, indent=2))
            mlflow.log_artifacts(tmp)
