"""Building a preference pool (paper §3.1, eq. 4-6), on Ray Data or in one process.

The stream: prompts -> ``RowMaker`` actors (``hgdpo.pool.generator``; one per GPU: each loads the model and
the scorer once; per prompt, the N images ``generator_batch`` at a time through the sampler and ``vae_batch`` at a
time through the VAE and the scorer (``pool.scorer``, PickScore by default; scores in float32), ranking,
the latents to keep) -> ``write_rows`` tasks (the winner's and loser's PNGs, then one atomic parquet part
per ``rows_per_file`` prompts), whose small summaries flow back to the driver for progress and
statistics. What leaves an actor is the row: the kept latents, the scores, and the winner's and loser's
pixels -- not N images. Nothing holds the pool in memory; the driver sees only prompt ids and scores.

Scoring is in the generator actor rather than a scorer stage of its own: no image crosses the object
store to be scored, the prompt is encoded once, and two GPU stages need not pipeline (Ray issue
#44767); the measurement is in benchmarks/bench_pool.py.

Input blocks hold at most ``rows_per_file`` prompts, and few enough that an actor's output for
one block stays a single block, so a lost actor redoes at most the block it was making and no row
reaches a writer twice. Resume: parts are whole or absent, so a rerun reads the prompt ids already
written, builds only the rest, and adds no duplicate. ``_COMPLETE.json`` is written when every
prompt has a row, with each part's size and sha256 as its writer hashed the bytes it wrote (a part
left by an earlier, interrupted run is read once to take them). Repair: a rerun on a finished pool
checks its parts against the manifest (sizes from a listing; checksums when asked to verify) and
on a bad part deletes the manifest and that part, then builds its prompts like missing ones.

``build_pool(cfg, local=True)`` is the same job without Ray: one process, the same ``RowMaker``
and ``write_rows``, the reference the tests and the benchmark compare the Ray job with.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from hgdpo import prompts as prompt_io
from hgdpo.config.core import to_dict
from hgdpo.errors import HgdpoError
from hgdpo.infra import storage, tracking
from hgdpo.infra.progress import SteadyRate, rate_text
from hgdpo.infra.quiet import show_progress
from hgdpo.infra.raycluster import ensure_ray, warn_if_not_shared
from hgdpo.models import loading as models
from hgdpo.pool import store as pool
from hgdpo.pool.config import NEWER_DATA_FIELDS, PoolConfig
from hgdpo.pool.generator import RowMaker
from hgdpo.pool.rows import columns, write_rows
from hgdpo.report.pictures import pairs_grid
from hgdpo.scorers.base import ScorerError
from hgdpo.scorers.registry import scorer_class


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
    k = (2 if cfg.hard_negatives else 1) * cfg.images_per_prompt if cfg.keep == "all" else 2
    return [k, unet["in_channels"], height // factor, width // factor], width, height


def check_scorer(cfg: PoolConfig, prompts: list[str]) -> None:
    """The ranking scorer's files and the prompts it must read, before any work; errors name the pool's
    settings (``scorer_model``, ``scorer_processor``)."""
    try:
        cls = scorer_class(cfg.scorer)
        cls.check(cfg.scorer_spec(), allow_pickle=cfg.allow_pickle)
        cls.check_prompts(prompts)
    except ScorerError as err:
        raise HgdpoError(err.renamed({"model": "scorer_model", "processor": "scorer_processor"})) from None


def _fingerprint_mismatch(old: dict, new: dict) -> list[str]:
    """The settings that differ; not where the prompt file is (a moved checkout resumes): its
    ``prompts_digest`` compares what it holds."""
    keys = sorted((set(old) | set(new)) - {"prompts"})
    return [k for k in keys if old.get(k) != new.get(k)]


def prepare(cfg: PoolConfig, log=print, mlflow: bool = True) -> tuple[list[prompt_io.Prompt], dict]:
    """Everything checked before any work: output, MLflow store (unless the job records no run),
    prompts, model, scorer, sizes. Returns prompts and meta."""
    storage.check_writable(cfg.output, "pool.output")
    if mlflow:
        tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "pool.mlflow_uri")
    items = prompt_io.read_prompts(cfg.prompts, **cfg.prompt_settings())
    source = models.check_model(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    check_scorer(cfg, [p.text for p in items])
    tokenizer = models.load_tokenizer(cfg.model, model_config=cfg.model_config)
    long = prompt_io.overlong(items, tokenizer)
    if long:
        example, length = long[0]
        print(f"warning: {len(long)} prompt(s) are longer than the text encoder's 77 tokens and will be "
              f"truncated, e.g. {example.id!r} ({length} tokens): {example.text[:80]!r}...", file=sys.stderr)
    latent_shape, width, height = _latent_shape(cfg, source)
    cfg.check_part_size(width, height, latent_shape)  # rows_per_file within the bound on one file (hgdpo.infra.storage)
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
        "scorer": {"name": cfg.scorer, "model": cfg.scorer_model, "processor": cfg.scorer_processor},
    }
    return items, meta


def block_size(cfg: PoolConfig, meta: dict, pending: int) -> int:
    """Prompts per input block: at most ``rows_per_file``; few enough that an actor's rows for one block
    stay under half of Ray Data's block size, so its output is one block, yielded when the block is
    done (a lost actor's block is then redone whole, never written twice); and small enough that every
    actor has work to the end."""
    import ray

    k, c, h, w = meta["latent_shape"]
    row_bytes = k * c * h * w * 2 + 2 * meta["width"] * meta["height"] * 3  # float16 latents, two uint8 images
    target = ray.data.DataContext.get_current().target_max_block_size or (128 << 20)
    spread = math.ceil(pending / (4 * cfg.generator_actors))
    return max(1, min(cfg.rows_per_file, target // (2 * row_bytes), spread))


def generator_stage(ds, cfg: PoolConfig, maker: type = RowMaker):
    """``ds`` (prompts: ``prompt_id``, ``prompt_index``, ``prompt``) through ``cfg.generator_actors``
    ``maker`` actors, a prompt per call: the rows (``hgdpo.pool.rows.ROW_COLUMNS``)."""
    import ray

    return ds.map_batches(maker, fn_constructor_kwargs={"config": to_dict(cfg)}, batch_size=1,
                          compute=ray.data.ActorPoolStrategy(size=cfg.generator_actors),
                          num_gpus=cfg.generator_gpus, num_cpus=cfg.generator_cpus, batch_format="numpy")


def _ray_rows(cfg: PoolConfig, pending: list[prompt_io.Prompt], meta: dict) -> Iterator[dict]:
    """The Ray Data stream of the pending prompts; yields each written row's summary."""
    import ray

    ensure_ray()
    ds = ray.data.from_items([{"prompt_id": p.id, "prompt_index": p.index, "prompt": p.text} for p in pending],
                             override_num_blocks=math.ceil(len(pending) / block_size(cfg, meta, len(pending))))
    ds = generator_stage(ds, cfg)
    ds = ds.map_batches(write_rows, fn_kwargs={"output": storage.absolute(cfg.output),
                                               "latent_shape": meta["latent_shape"]},
                        batch_size=cfg.rows_per_file, num_cpus=cfg.writer_cpus, batch_format="numpy")
    yield from ds.iter_rows()


def _local_rows(cfg: PoolConfig, pending: list[prompt_io.Prompt], meta: dict, log) -> Iterator[dict]:
    """The same rows in this process, without Ray: ``rows_per_file`` prompts a part, in prompt order."""
    maker = RowMaker(to_dict(cfg), actor=False, log=log)
    for start in range(0, len(pending), cfg.rows_per_file):
        chunk = pending[start: start + cfg.rows_per_file]
        summary = write_rows(columns([maker.make(p.id, p.index, p.text) for p in chunk]),
                             storage.absolute(cfg.output), meta["latent_shape"])
        for i in range(len(chunk)):
            yield {key: values[i] for key, values in summary.items()}


class Progress:
    """The job's progress line, and the same figures as MLflow metrics (step: prompts done).

    Rows arrive a part at a time (a written file's rows together): the rate and the time left come
    from whole parts after the first wave, over a recent window (``hgdpo.infra.progress``)."""

    def __init__(self, cfg: PoolConfig, total: int, done: int, log, metrics=None, actors: int = 1):
        self.cfg, self.total, self.before, self.log, self.metrics = cfg, total, done, log, metrics
        self.start = self.shown = time.perf_counter()
        self.built, self.last_part = 0, None
        self.bucket = done * 20 // max(total, 1)  # the 5% of the prompts last shown
        self.images = cfg.images_per_prompt * (2 if cfg.hard_negatives else 1)  # with each seed's negative
        self.rate = SteadyRate(actors)  # the actors' first parts carry their start-up

    def row(self, part: str, part_rows: int) -> None:
        """A row of ``part`` (a file of ``part_rows`` rows) has arrived."""
        now = time.perf_counter()
        self.built += 1
        if part != self.last_part:  # the part's first row: the part is written
            self.last_part = part
            self.rate.part(part_rows * self.images, now)
        done = self.before + self.built
        if not show_progress(done, self.total, self.bucket, now - self.shown):
            return
        self.shown, self.bucket = now, done * 20 // self.total
        left = (self.total - done) * self.images
        self.log(f"pool: {done}/{self.total} prompts done ({100 * done / self.total:.0f}%)"
                 f"{rate_text(self.rate, left)}")
        steady = self.rate.rate()
        if self.metrics is not None and steady is not None:
            self.metrics({"prompts_done": done, "images_per_s": steady, "seconds_left": left / steady}, step=done)
        elif self.metrics is not None:
            self.metrics({"prompts_done": done}, step=done)


@contextlib.contextmanager
def _mlflow_run(cfg: PoolConfig, meta: dict, enabled: bool):
    """The job's MLflow run, opened when work starts; yields a metrics logger (None when disabled)."""
    if not enabled:
        yield None
        return
    import mlflow

    with tracking.run(cfg.mlflow_uri, cfg.mlflow_experiment, run_name=f"pool:{storage.name(cfg.output)}"):
        mlflow.log_params(tracking.flat_params(to_dict(cfg)))
        mlflow.set_tags({"stage": "pool", "output": storage.absolute(cfg.output),
                         **{f"version.{k}": v for k, v in meta["versions"].items()}})
        yield mlflow.log_metrics


def _usable_parts(output: str, st: pool.PoolState, bad: dict[str, str], log) -> tuple[set[str], dict[str, dict]]:
    """The prompt ids already built, and the manifest entries known for their parts, once the parts that
    cannot serve are deleted: ``bad`` (parts of a finished pool that are missing, of another size or,
    verified, of other bytes) and any that cannot be read. A finished pool's manifest goes first, so the
    pool never looks complete without them; their prompts are then built again like missing ones."""
    ids, unreadable = pool.part_ids(output, [name for name in st.parts if name not in bad])
    drop = {**bad, **unreadable}
    known = dict(st.complete.get("files", {})) if st.complete is not None else {}
    if drop and st.complete is not None:
        pool.unmark_complete(output)
    for name, why in drop.items():
        log(f"pool: part {name} {why}: deleted, its prompts are built again")
        storage.delete(storage.join(output, name))
        known.pop(name, None)
    if st.complete is not None and "files" not in st.complete:
        log("pool: the manifest records no part sizes (written before they were); each part is read once to "
            "record them")
    return pool.union_ids(output, ids), known


def build_pool(cfg: PoolConfig, log=print, mlflow: bool = True, local: bool = False,
               verify: bool = False) -> PoolResult:
    """Build (or finish, or repair) the pool described by ``cfg``; log progress; return what was done.
    ``mlflow``: record the job in an MLflow run. ``local``: in this process, without Ray (the reference
    path). On a finished pool every part is checked against the manifest: its presence and size always
    (no read), its bytes' checksum too with ``verify`` (every part is read); a bad part is deleted and
    only its prompts are built again."""
    items, meta = prepare(cfg, log, mlflow)
    if not local:
        warn_if_not_shared(cfg.output, "pool.output", log)
    st = pool.state(cfg.output)
    if st.meta is not None:
        diff = _fingerprint_mismatch(st.meta.get("fingerprint", {}), meta["fingerprint"])
        if diff:
            old, new = st.meta["fingerprint"], meta["fingerprint"]
            detail = "; ".join(f"{k}: {old.get(k, NEWER_DATA_FIELDS.get(k))!r} there, "
                               f"{new.get(k, NEWER_DATA_FIELDS.get(k))!r} now" for k in diff[:4])
            raise HgdpoError(f"output: {cfg.output} holds a pool written with another config ({detail}); "
                             f"choose another output or rerun with the pool's config")
    bad: dict[str, str] = {}
    if st.complete is not None:
        bad = pool.bad_parts(cfg.output, st, read=verify)
        if not bad and "files" in st.complete:
            checked = "every part's checksum matches" if verify else "every part has its recorded size"
            log(f"pool: {cfg.output} is already complete ({st.complete['rows']} prompts, {checked}); nothing to do")
            return PoolResult(cfg.output, len(items), 0, 0.0, cfg.images_per_prompt, skipped=True)
    if st.meta is not None and st.meta["format"] != pool.FORMAT:
        raise HgdpoError(f"output: {cfg.output} holds a pool of format {st.meta['format']} (an earlier version), which "
                         f"is read as it is but not extended or repaired in format {pool.FORMAT}: build the pool "
                         f"again in another output")
    storage.probe_write(cfg.output, "pool.output")
    if st.meta is None:
        pool.init(cfg.output, meta)
    else:
        removed = pool.remove_temporaries(cfg.output)
        if removed:
            log(f"pool: removed {removed} half-written file(s) left by an interrupted run")
    done, files = _usable_parts(cfg.output, st, bad, log)
    pending = [p for p in items if p.id not in done]
    log(f"pool: {len(items)} prompts, {len(done)} already built, {len(pending)} to build "
        f"({cfg.images_per_prompt} images each) -> {cfg.output}")

    result = PoolResult(cfg.output, len(items), 0, 0.0, cfg.images_per_prompt)
    with _mlflow_run(cfg, meta, mlflow) as metrics:
        progress = Progress(cfg, len(items), len(done), log, metrics, actors=1 if local else cfg.generator_actors)
        if pending:
            rows = _local_rows(cfg, pending, meta, log) if local else _ray_rows(cfg, pending, meta)
            for row in rows:
                files[str(row["part"])] = {"rows": int(row["part_rows"]), "bytes": int(row["part_bytes"]),
                                           "sha256": str(row["part_sha256"])}
                result.built += 1
                result.score_w.append(float(row["score_w"]))
                result.score_l.append(float(row["score_l"]))
                result.score_mean.append(float(row["score_mean"]))
                progress.row(str(row["part"]), int(row["part_rows"]))
        result.seconds = time.perf_counter() - progress.start
        st = pool.state(cfg.output)
        done = pool.done_prompt_ids(cfg.output, st.parts)
        missing = [p.id for p in items if p.id not in done]
        if missing:
            raise HgdpoError(f"pool: {len(missing)} prompts have no row after the run (first: {missing[0]!r}); "
                             f"rerun to finish")
        pool.mark_complete(cfg.output, st.parts, len(done), files)
        log(f"pool: complete, {len(done)} prompts in {len(st.parts)} files at {cfg.output}")
        if metrics is not None:
            _record(cfg, result, meta, st.parts)
    return result


def _record(cfg: PoolConfig, result: PoolResult, meta: dict, parts: list[str]) -> None:
    """The rest of the job's MLflow run: throughput, score statistics, a picture of the first pairs
    (read from one part), the pool's metadata."""
    import mlflow

    metrics = {"prompts_total": result.total, "prompts_built": result.built, "seconds": result.seconds,
               "images_per_s": result.images_per_second}
    if result.built:
        gap = np.asarray(result.score_w) - np.asarray(result.score_l)
        metrics.update(score_winner_mean=float(np.mean(result.score_w)), score_loser_mean=float(np.mean(result.score_l)),
                       score_mean=float(np.mean(result.score_mean)), score_gap_mean=float(gap.mean()),
                       score_gap_std=float(gap.std()), score_gap_min=float(gap.min()))
    mlflow.log_metrics(metrics)
    first = storage.read_parquet(storage.join(cfg.output, parts[0]), columns=["prompt_index", "prompt", "image_w",
                                                                               "image_l"])
    shown = first.sort_by("prompt_index").slice(0, cfg.log_pairs).to_pylist()
    rows = [(r["prompt"], pool.png_image(r["image_w"]), pool.png_image(r["image_l"])) for r in shown]
    with tempfile.TemporaryDirectory() as tmp:
        if rows:
            pairs_grid(rows).save(Path(tmp) / "pairs.png")
        (Path(tmp) / "pool.json").write_text(json.dumps(meta, indent=2))
        mlflow.log_artifacts(tmp)
