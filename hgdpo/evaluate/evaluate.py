"""Evaluation (paper §4): model A against baseline B on test prompts, by win rates and colour.

The stream, on Ray Data: prompts -> ``GenerateAB`` actors (per prompt, A's and B's images from
the same seeds; one pipeline serves both when they share a base model) -> ``ScoreAB`` actors
(every scorer rates every image; mean H, S, V; PNGs) -> the driver, which holds only scores,
colours and PNG bytes. Then: win rates with bootstrap intervals (``hgdpo.report.winrates``), the colour
table (Table 2), a side-by-side picture, all written to the output folder and to MLflow, and a
table on stdout.

Evaluations that share baseline B (a sweep's trials: one B, many A's) make B's rows once:
``build_baseline`` writes them into a cache folder under a digest of everything they depend on,
and ``evaluate(..., baseline_cache=...)`` reads them from there and makes only A's.

Output folder: ``scores.parquet`` (one row per prompt and seed: seeds, scores, colours, both
PNGs), ``side_by_side.png``, ``table.md`` and last ``report.json``; each is written atomically
(``hgdpo.infra.storage``: a local folder or a URI), so a folder with ``report.json`` is complete. A rerun with the same
settings prints the stored table and does nothing else; other settings are refused.

``scores.parquet`` is a folder of parts (``part-00000.parquet``, ... of ``rows_per_part`` rows, then
``_COMPLETE.json``: ``hgdpo.infra.storage.write_parquet_parts``), because all of an evaluation's PNGs in one
file would pass the bound on one file (5 GiB: 2,000 prompts x 2 seeds at 704x1024 is several GB).
Evaluations written before parts hold it as one file; ``read_scores`` reads both. A baseline cache's
``rows.parquet`` is split the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hgdpo import prompts as prompt_io
from hgdpo.config.core import changed_settings, from_dict, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.evaluate.config import EvalConfig
from hgdpo.infra import storage, tracking
from hgdpo.infra.progress import SteadyRate, rate_text
from hgdpo.infra.quiet import show_progress
from hgdpo.infra.raycluster import TorchThread, warn_if_not_shared
from hgdpo.models import lan
from hgdpo.models import loading as models
from hgdpo.report.winrates import WinRate, mean_hsv, percent_change, win_rate

REPORT = "report.json"
SCORES = "scores.parquet"  # a folder of parts (a single file in evaluations written before parts)
SIDES = ("a", "b")
LAYOUT_SETTINGS = ("rows_per_part",)  # how the scores are split into files: not another evaluation


def scorer_specs(cfg: EvalConfig) -> list:
    from hgdpo.scorers.registry import ScorerSpec

    return [ScorerSpec(name, *cfg.scorer_sources(name)) for name in cfg.scorers]


class GenerateAB:
    """Ray Data actor: loads the base model (and adapters) once; per prompt, the images of ``sides``
    (A's and B's, or one side's when the other's rows come from elsewhere)."""

    def __init__(self, config: dict, sides: tuple[str, ...] = SIDES):
        self.torch_thread = TorchThread("eval-generate")  # loading and every batch on one thread
        self.torch_thread.run(self._load, config, sides)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.torch_thread.run(self._rows, batch)

    def _load(self, config: dict, sides: tuple[str, ...]) -> None:
        from hgdpo.infra.quiet import quiet_libraries
        from hgdpo.models.sampling import native_size, resolve_device_dtype, set_sampler, set_threads

        self.cfg = cfg = from_dict(EvalConfig, config)
        quiet_libraries()
        set_threads(cfg.generator_cpus)
        device, dtype = resolve_device_dtype(cfg.dtype)
        self.sides = tuple(sides)
        self.pipes = {}  # adapter path (None: the base model alone) -> pipeline
        for side in self.sides:
            adapter = cfg.side(side)["adapter"]
            if adapter in self.pipes:
                continue
            reuse = next(iter(self.pipes.values()), None) if adapter is None else None
            if reuse is not None:  # a base-model side runs on any pipeline with its adapter bypassed
                self.pipes[None] = reuse
                continue
            pipe = models.load_pipeline(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle,
                                        dtype=dtype, device=device)
            set_sampler(pipe, cfg.sampler)
            if adapter is not None:
                lan.load_adapter(pipe, adapter, cfg.model, allow_pickle=cfg.allow_pickle)
            self.pipes[adapter] = pipe
            if None not in self.pipes:
                self.pipes[None] = pipe
        native_w, native_h = native_size(next(iter(self.pipes.values())))
        self.width, self.height = cfg.width or native_w, cfg.height or native_h

    def _rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hgdpo.models.sampling import image_seeds

        cfg, out = self.cfg, defaultdict(list)
        for pid, text in zip(batch["prompt_id"], batch["prompt"]):
            seeds = image_seeds(cfg.seed, str(pid), cfg.images_per_prompt)
            out["seeds"].append(np.asarray(seeds, dtype=np.int64))
            for side in self.sides:
                s = cfg.side(side)
                _, images = lan.sample(self.pipes[s["adapter"]], str(text), seeds, steps=cfg.steps,
                                       guidance_scale=cfg.guidance_scale, width=self.width, height=self.height,
                                       negative_prompt=cfg.negative_prompt, alpha=s["alpha"], lan=s["lan"])
                out[f"images_{side}"].append(images)
        return {**{k: batch[k] for k in ("prompt_id", "prompt_index", "prompt")},
                **{k: np.stack(v) for k, v in out.items()}}


class ScoreAB:
    """Ray Data actor: loads every scorer once; scores, colours and PNGs of the images of ``sides``."""

    def __init__(self, config: dict, sides: tuple[str, ...] = SIDES):
        self.torch_thread = TorchThread("eval-score")  # loading and every batch on one thread
        self.torch_thread.run(self._load, config, sides)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.torch_thread.run(self._rows, batch)

    def _load(self, config: dict, sides: tuple[str, ...]) -> None:
        from hgdpo.infra.quiet import quiet_libraries
        from hgdpo.models.sampling import resolve_device_dtype, set_threads
        from hgdpo.scorers.registry import load_scorer

        self.cfg = cfg = from_dict(EvalConfig, config)
        self.sides = tuple(sides)
        quiet_libraries()
        set_threads(cfg.scorer_cpus)
        device, _ = resolve_device_dtype(cfg.dtype)
        self.scorers = [load_scorer(spec, allow_pickle=cfg.allow_pickle, device=device) for spec in scorer_specs(cfg)]

    def _rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hgdpo.pool.store import png_bytes

        out = defaultdict(list)
        for i, text in enumerate(batch["prompt"]):
            for side in self.sides:
                images = batch[f"images_{side}"][i]  # (K, H, W, 3)
                captions = [str(text)] * len(images)
                for name, scorer in zip(self.cfg.scorers, self.scorers):
                    out[f"score_{side}_{name}"].append(np.asarray(scorer(captions, images), dtype=np.float64))
                out[f"hsv_{side}"].append(mean_hsv(images))
                out[f"png_{side}"].append([png_bytes(im) for im in images])
        result = {k: batch[k] for k in ("prompt_id", "prompt_index", "prompt", "seeds")}
        for key, values in out.items():
            if key.startswith("png_"):  # one list of K PNGs per prompt: an Arrow list<binary> column
                column = np.empty(len(values), dtype=object)
                for i, pngs in enumerate(values):
                    column[i] = pngs
                result[key] = column
            else:
                result[key] = np.stack(values)
        return result


@dataclass
class EvalResult:
    output: str
    prompts: int
    comparisons: int
    seconds: float
    win_rates: dict[str, WinRate] = field(default_factory=dict)
    mean_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # scorer -> side -> mean
    hsv: dict[str, list[float]] = field(default_factory=dict)  # side -> mean (H, S, V)
    hsv_change: list[float] = field(default_factory=list)  # A against B, percent
    objects: dict[str, float] = field(default_factory=dict)  # the world's object-level rates (object_metrics)
    generated: dict[str, int] = field(default_factory=dict)  # side -> images this evaluation made of it
    baseline_cache: str | None = None  # where B's images and scores were read from (None: made here)
    skipped: bool = False  # the output already held this evaluation

    def metrics(self) -> dict[str, float]:
        """Flat figures, as MLflow metrics and Ray Tune results name them."""
        out = {"prompts": float(self.prompts), "comparisons": float(self.comparisons)}
        for name, wr in self.win_rates.items():
            out.update({f"win_rate_{name}": wr.rate, f"win_rate_{name}_low": wr.low,
                        f"win_rate_{name}_high": wr.high})
            for side in SIDES:
                out[f"mean_{side}_{name}"] = self.mean_scores[name][side]
        for side in SIDES:
            for channel, value in zip("hsv", self.hsv.get(side, [])):
                out[f"{channel}_{side}"] = value
        for channel, value in zip("hsv", self.hsv_change):
            out[f"{channel}_change_pct"] = value
        for side, images in self.generated.items():
            out[f"generated_images_{side}"] = float(images)
        out.update(self.objects)
        return out

    def to_json(self) -> dict:
        data = asdict(self)
        data["metrics"] = self.metrics()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "EvalResult":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["win_rates"] = {k: WinRate(**v) for k, v in data["win_rates"].items()}
        return cls(**data)


def describe_side(cfg: EvalConfig, side: str, cache: str | None = None) -> str:
    """``cache``: where this side's images and scores were read from."""
    s = cfg.side(side)
    text = (f"base model {cfg.model!r}" if s["adapter"] is None
            else f"adapter {s['adapter']} (alpha {s['alpha']:g}{', LAN' if s['lan'] else ''})")
    return text + (f", images and scores read from {cache}" if cache else "")


def summary(cfg: EvalConfig, result: EvalResult) -> str:
    """The short report a whole run ends with: each scorer's win rate, A's colour change, where the full
    report (``table``: means, counts, colours, the world's objects) is."""
    pct = int(round(100 * cfg.confidence))
    lines = [f"A ({describe_side(cfg, 'a')}) against B ({describe_side(cfg, 'b', result.baseline_cache)}), "
             f"{result.comparisons} comparisons on {result.prompts} prompts:"]
    for name, wr in result.win_rates.items():
        lines.append(f"  {name}: A wins {100 * wr.rate:.1f}% ({pct}% interval {100 * wr.low:.1f} to {100 * wr.high:.1f})")
    h, s, v = result.hsv_change
    lines += [f"  A's colours against B's: hue {h:+.2f}%, saturation {s:+.2f}%, value {v:+.2f}%",
              f"the full report: {storage.join(cfg.output, 'table.md')}"]
    return "\n".join(lines)


def table(cfg: EvalConfig, result: EvalResult) -> str:
    """The readable report: win rates per scorer, then the colour table (paper Tables 1 and 2)."""
    pct = int(round(100 * cfg.confidence))
    lines = [f"A: {describe_side(cfg, 'a')}", f"B: {describe_side(cfg, 'b', result.baseline_cache)}",
             f"{result.prompts} prompts x {cfg.images_per_prompt} seed(s) = {result.comparisons} comparisons", "",
             f"| scorer | A wins | {pct}% interval | A mean | B mean | wins / ties / losses |",
             "|---|---|---|---|---|---|"]
    for name, wr in result.win_rates.items():
        m = result.mean_scores[name]
        lines.append(f"| {name} | {100 * wr.rate:.1f}% | [{100 * wr.low:.1f}, {100 * wr.high:.1f}] | "
                     f"{m['a']:.4g} | {m['b']:.4g} | {wr.wins} / {wr.ties} / {wr.losses} |")
    lines += ["", "| colour | H | S | V |", "|---|---|---|---|"]
    for side in SIDES:
        h, s, v = result.hsv[side]
        lines.append(f"| {side.upper()} | {h:.4f} | {s:.4f} | {v:.4f} |")
    h, s, v = result.hsv_change
    lines.append(f"| A vs B | {h:+.2f}% | {s:+.2f}% | {v:+.2f}% |")
    if result.objects:
        lines += ["", f"| objects (the world's judge) | A | B | A - B [{pct}% interval] |", "|---|---|---|---|"]
        for rate, label in OBJECT_RATES:
            o = result.objects
            if f"{rate}_a" in o:
                lines.append(f"| {label} | {100 * o[f'{rate}_a']:.1f}% | {100 * o[f'{rate}_b']:.1f}% | "
                             f"{100 * o[f'{rate}_diff']:+.1f} [{100 * o[f'{rate}_diff_low']:+.1f}, "
                             f"{100 * o[f'{rate}_diff_high']:+.1f}] |")
    return "\n".join(lines)


def prepare(cfg: EvalConfig, mlflow: bool = True) -> list[prompt_io.Prompt]:
    """Every check before any work: storage, MLflow store (unless no run is recorded), prompts, model,
    adapters, scorers (and the judge's prompts)."""
    from hgdpo.scorers.registry import check_prompts, check_scorer

    storage.check_writable(cfg.output, "evaluate.output")
    for name in ("adapter", "baseline_adapter"):
        if getattr(cfg, name) is not None:
            storage.check_reachable(getattr(cfg, name), f"evaluate.{name}")
    if mlflow:
        tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "evaluate.mlflow_uri")
    items = prompt_io.read_prompts(cfg.prompts, **cfg.prompt_settings())
    source = models.check_model(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    cfg.check_file_size(*image_size(cfg, source))
    for name in ("adapter", "baseline_adapter"):
        if getattr(cfg, name) is not None:
            try:
                lan.check_adapter(getattr(cfg, name), cfg.model, allow_pickle=cfg.allow_pickle)
            except HgdpoError as err:
                raise HgdpoError(f"{name}: {err}") from None
    for spec in scorer_specs(cfg):
        check_scorer(spec, allow_pickle=cfg.allow_pickle)
        check_prompts(spec, [p.text for p in items])
    return items


def image_size(cfg: EvalConfig, source: models.ModelSource) -> tuple[int, int]:
    """(width, height) of the images: the configured ones, else the model's native size (its UNet's sample
    size times its VAE's factor, as ``hgdpo.models.sampling.native_size``), from the configs alone."""
    if cfg.width and cfg.height:
        return cfg.width, cfg.height
    from diffusers import AutoencoderKL

    unet = models.component_config(cfg.model, "unet", model_config=cfg.model_config)
    location = models._config_location(source, cfg.model_config)
    try:
        vae = AutoencoderKL.load_config(location, subfolder="vae")
    except (OSError, ValueError) as err:
        raise HgdpoError(f"model: cannot read the VAE config of {location}: {err}") from None
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return cfg.width or side, cfg.height or side


def _settled(cfg: EvalConfig) -> EvalResult | None:
    """The stored result when ``cfg.output`` already holds this evaluation; refuse other settings."""
    path = storage.join(cfg.output, REPORT)
    with storage.errors("evaluate.output", cfg.output):
        if not storage.is_file(path):
            return None
        data = storage.read_json(path, "evaluation report")
    try:
        stored, result = data["config"], EvalResult.from_json(data["result"])
        if not isinstance(stored, dict):
            raise TypeError("config is not a mapping")
    except (KeyError, TypeError) as err:
        raise HgdpoError(f"output: {path} is not an evaluation report ({err}); use another output") from None
    changed = [k for k in changed_settings(stored, to_dict(cfg), EvalConfig) if k not in LAYOUT_SETTINGS]
    if changed:
        raise HgdpoError(f"output: {cfg.output} holds an evaluation with other settings ({', '.join(changed[:5])}); "
                         f"use another output")
    result.skipped = True
    return result


def generate_and_score(cfg: EvalConfig, items: list[prompt_io.Prompt], log=print, sides: tuple[str, ...] = SIDES):
    """Run the Ray Data stream for ``sides``; yield each prompt's finished row (driver side) as it arrives."""
    import ray

    from hgdpo.infra.raycluster import ensure_ray

    ensure_ray()
    kwargs = {"config": to_dict(cfg), "sides": tuple(sides)}
    ds = ray.data.from_items([{"prompt_id": p.id, "prompt_index": p.index, "prompt": p.text} for p in items],
                             override_num_blocks=min(len(items), max(8, 4 * cfg.generator_actors)))
    ds = ds.map_batches(GenerateAB, fn_constructor_kwargs=kwargs, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=cfg.generator_actors),
                        num_gpus=cfg.generator_gpus, num_cpus=cfg.generator_cpus, batch_format="numpy")
    ds = ds.map_batches(ScoreAB, fn_constructor_kwargs=kwargs, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=cfg.scorer_actors),
                        num_gpus=cfg.scorer_gpus, num_cpus=cfg.scorer_cpus, batch_format="numpy")
    images = len(sides) * cfg.images_per_prompt  # a prompt's row: a part of this stage
    rate = SteadyRate(cfg.generator_actors)  # the actors' first rows carry their start-up
    last = time.perf_counter()
    shown, done = 0, 0
    for row in ds.iter_rows():
        done += 1
        now = time.perf_counter()
        rate.part(images, now)
        if show_progress(done, len(items), shown, now - last):  # a line per 5% of the prompts
            shown, last = done * 20 // len(items), now
            log(f"evaluate: {done}/{len(items)} prompts done ({100 * done / len(items):.0f}%)"
                f"{rate_text(rate, (len(items) - done) * images)}")
        yield row


# --- Baseline B made once: its rows kept for every evaluation that shares it (a sweep's trials) ---

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
    import pyarrow as pa

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


def summarize(cfg: EvalConfig, rows: list[dict]) -> EvalResult:
    """Win rates per scorer, mean scores, and colours from the rows of every (prompt, seed)."""
    groups = np.concatenate([[r["prompt_id"]] * len(r["seeds"]) for r in rows])
    result = EvalResult(cfg.output, len(rows), len(groups), 0.0)
    for name in cfg.scorers:
        a = np.concatenate([r[f"score_a_{name}"] for r in rows])
        b = np.concatenate([r[f"score_b_{name}"] for r in rows])
        result.win_rates[name] = win_rate(a, b, groups, resamples=cfg.bootstrap, confidence=cfg.confidence,
                                          seed=cfg.seed)
        result.mean_scores[name] = {"a": float(a.mean()), "b": float(b.mean())}
    for side in SIDES:
        result.hsv[side] = np.concatenate([r[f"hsv_{side}"] for r in rows]).mean(axis=0).tolist()
    result.hsv_change = percent_change(result.hsv["a"], result.hsv["b"]).tolist()
    if "judge" in cfg.scorers:
        result.objects = object_metrics(cfg, rows)
    return result


OBJECT_RATES = (("object_colour_acc", "colour right"), ("object_shape_acc", "shape right"),
                ("object_size_acc", "size right (where stated)"), ("object_position_acc", "position right (where stated)"),
                ("relation_acc", "relation right"), ("leakage", "attribute leakage"))


def object_metrics(cfg: EvalConfig, rows: list[dict]) -> dict[str, float]:
    """The world's object-level report of A's and B's images (``hgdpo.world.objects``): per-object colour,
    shape, size and position accuracy, relation accuracy and attribute leakage, paired by (prompt, seed),
    with bootstrap intervals over prompts. From the PNGs, in the driver: the judge reads each image again
    (a few milliseconds each)."""
    from hgdpo.pool.store import png_image
    from hgdpo.world.objects import object_report
    from hgdpo.world.objects import summarize as summarize_objects

    reports: dict[str, list] = {side: [] for side in SIDES}
    groups = []
    for r in rows:
        for k in range(len(r["seeds"])):
            groups.append(str(r["prompt_id"]))
            for side in SIDES:
                reports[side].append(object_report(png_image(bytes(r[f"png_{side}"][k])), str(r["prompt"])))
    return summarize_objects(reports["a"], reports["b"], groups, resamples=cfg.bootstrap, confidence=cfg.confidence,
                             seed=cfg.seed)


def write_scores(path: str, cfg: EvalConfig, rows: list[dict]) -> None:
    """One parquet row per (prompt, seed): ids, seed, every score, colours, both PNGs; a part of at most
    ``cfg.rows_per_part`` rows per file (``storage.write_parquet_parts``), built one part at a time."""
    storage.write_parquet_parts(path, _score_parts(cfg, rows))


def _score_parts(cfg: EvalConfig, rows: list[dict]):
    import pyarrow as pa

    columns = defaultdict(list)
    for r in rows:
        for k, seed in enumerate(r["seeds"]):
            if columns and len(columns["prompt_id"]) == cfg.rows_per_part:
                yield pa.table(dict(columns))
                columns = defaultdict(list)
            columns["prompt_id"].append(str(r["prompt_id"]))
            columns["prompt_index"].append(int(r["prompt_index"]))
            columns["prompt"].append(str(r["prompt"]))
            columns["k"].append(k)
            columns["seed"].append(int(seed))
            for side in SIDES:
                for name in cfg.scorers:
                    columns[f"score_{side}_{name}"].append(float(r[f"score_{side}_{name}"][k]))
                for channel, value in zip("hsv", r[f"hsv_{side}"][k]):
                    columns[f"{channel}_{side}"].append(float(value))
                columns[f"image_{side}"].append(bytes(r[f"png_{side}"][k]))
    yield pa.table(dict(columns))


def read_scores(output: str, columns: list[str] | None = None):
    """The scores table of the evaluation in folder ``output``, one row per (prompt, seed) in prompt order:
    its parts (checked against their manifest), or the single ``scores.parquet`` of an evaluation written
    before parts."""
    return storage.read_parquet(storage.join(output, SCORES), columns=columns)


def has_scores(output: str) -> bool:
    """``output`` holds an evaluation's finished scores (either layout)."""
    return storage.is_parquet(storage.join(output, SCORES))


def side_by_side(cfg: EvalConfig, rows: list[dict]):
    """A PIL picture: the first prompts, A's and B's first image side by side."""
    from hgdpo.pool.store import png_image
    from hgdpo.report.pictures import pairs_grid

    shown = rows[:cfg.picture_prompts]
    return pairs_grid([(str(r["prompt"]), png_image(r["png_a"][0]), png_image(r["png_b"][0])) for r in shown],
                      labels=("A", "B"))


def record(cfg: EvalConfig, result: EvalResult, files: dict[str, bytes], run_id: str | None = None) -> None:
    """The evaluation's MLflow run (or ``run_id``, a sweep trial's): settings, figures, and ``files``
    (name -> content: the report, the table, the picture), sent to the tracking server, not read back
    from the output (which may be on another store)."""
    import tempfile

    import mlflow

    name = f"evaluate:{storage.name(cfg.output)}"
    with tracking.run(cfg.mlflow_uri, cfg.mlflow_experiment, run_name=name, run_id=run_id):
        if run_id is None:
            mlflow.log_params(tracking.flat_params(to_dict(cfg)))
            mlflow.set_tags({"stage": "evaluate", "output": storage.absolute(cfg.output)})
        if result.baseline_cache is not None:
            mlflow.set_tag("baseline_cache", result.baseline_cache)
        mlflow.log_metrics(result.metrics())
        with tempfile.TemporaryDirectory() as tmp:
            for file, content in files.items():
                Path(tmp, file).write_bytes(content)
            mlflow.log_artifacts(tmp, artifact_path="evaluation")


def evaluate(cfg: EvalConfig, *, log=print, mlflow_run_id: str | None = None, record_mlflow: bool = True,
             baseline_cache: str | None = None) -> EvalResult:
    """Evaluate A against B as ``cfg`` says; write the output folder; record the run in MLflow.

    ``baseline_cache``: a folder of ``build_baseline``; when it holds B's rows for these settings and
    test prompts, B's images and scores are read from it and only A's are made.
    """
    settled = _settled(cfg)
    if settled is not None:
        log(f"evaluate: {cfg.output} already holds this evaluation; nothing to do")
        return settled
    items = prepare(cfg, mlflow=record_mlflow)
    for name in ("adapter", "baseline_adapter"):  # read by generator actors, on any node
        if getattr(cfg, name) is not None:
            warn_if_not_shared(getattr(cfg, name), f"evaluate.{name}", log)
    output = cfg.output
    storage.probe_write(output, "evaluate.output")
    cached = read_baseline(baseline_cache, cfg, items) if baseline_cache is not None else None
    if baseline_cache is not None and cached is None:
        log(f"evaluate: {baseline_cache} holds no baseline rows for these settings; B's images are made here")
    location, baseline = cached or (None, {})
    sides = ("a",) if cached else SIDES
    log(f"evaluate: {len(items)} prompts x {cfg.images_per_prompt} seed(s); A = {describe_side(cfg, 'a')}, "
        f"B = {describe_side(cfg, 'b', location)}; scorers {', '.join(cfg.scorers)}")
    start = time.perf_counter()
    rows = sorted(generate_and_score(cfg, items, log, sides=sides), key=lambda r: int(r["prompt_index"]))
    if cached:  # B's columns beside A's
        merged = []
        for row in rows:
            b = baseline[str(row["prompt_id"])]
            if not np.array_equal(b["seeds"], row["seeds"]):  # the key covers the seeds: a damaged cache
                raise HgdpoError(f"baseline cache: {location}: the seeds of prompt {row['prompt_id']} differ from "
                                 f"this evaluation's; delete the folder to have it made again")
            merged.append({**row, **b})
        rows = merged
    result = summarize(cfg, rows)
    result.seconds = time.perf_counter() - start
    result.generated = {side: len(rows) * cfg.images_per_prompt if side in sides else 0 for side in SIDES}
    result.baseline_cache = location

    files = {"table.md": (table(cfg, result) + "\n").encode()}
    if cfg.picture_prompts:
        picture = io.BytesIO()
        side_by_side(cfg, rows).save(picture, format="PNG")
        files["side_by_side.png"] = picture.getvalue()
    report = {"config": to_dict(cfg), "versions": tracking.versions(), "result": result.to_json()}
    files[REPORT] = json.dumps(report, indent=2).encode()  # last: a folder with a report is complete
    write_scores(storage.join(output, SCORES), cfg, rows)
    for file, content in files.items():
        storage.write_bytes(storage.join(output, file), content)
    if record_mlflow:
        record(cfg, result, files, run_id=mlflow_run_id)
    return result
