"""Evaluation (paper §4): model A against baseline B on test prompts, by win rates and colour.

The stream, on Ray Data (``hgdpo.evaluate.actors``): prompts -> ``GenerateAB`` actors (per prompt, A's
and B's images from the same seeds) -> ``ScoreAB`` actors (every scorer rates every image; mean H, S,
V; PNGs) -> the driver, which holds only scores, colours and PNG bytes. Then
(``hgdpo.evaluate.eval_result``): win rates with bootstrap intervals (``hgdpo.report.winrates``), the
colour table (Table 2), the scorers' reports (the judge's objects), a side-by-side picture, all
written to the output folder and to MLflow, and a table on stdout.

Evaluations that share baseline B (a sweep's trials: one B, many A's) make B's rows once:
``build_baseline`` writes them into a cache folder under a digest of everything they depend on,
and ``evaluate(..., baseline_cache=...)`` reads them from there and makes only A's
(``hgdpo.evaluate.baseline``).

Output folder: ``scores.parquet`` (one row per prompt and seed: seeds, scores, colours, both
PNGs), ``side_by_side.png``, ``table.md`` and last ``report.json``; each is written atomically
(``hgdpo.infra.storage``: a local folder or a URI), so a folder with ``report.json`` is complete. A rerun with the same
settings prints the stored table and does nothing else; other settings are refused.

``scores.parquet`` is a folder of parts (``hgdpo.evaluate.scores_file``); a baseline cache's
``rows.parquet`` is split the same way.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from hgdpo import prompts as prompt_io
from hgdpo.config.core import changed_settings, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.evaluate.actors import generate_and_score, scorer_specs
from hgdpo.evaluate.baseline import read_baseline
from hgdpo.evaluate.config import EvalConfig
from hgdpo.evaluate.eval_result import EvalResult, describe_side, summarize, table
from hgdpo.evaluate.scores_file import SCORES, SIDES, write_scores
from hgdpo.infra import storage, tracking
from hgdpo.infra.raycluster import warn_if_not_shared
from hgdpo.models import lan
from hgdpo.models import loading as models
from hgdpo.pool.store import png_image
from hgdpo.report.pictures import pairs_grid
from hgdpo.scorers.registry import check_prompts, check_scorer

REPORT = "report.json"
LAYOUT_SETTINGS = ("rows_per_part",)  # how the scores are split into files: not another evaluation


def prepare(cfg: EvalConfig, mlflow: bool = True) -> list[prompt_io.Prompt]:
    """Every check before any work: storage, MLflow store (unless no run is recorded), prompts, model,
    adapters, scorers (and the judge's prompts)."""
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
    from diffusers import AutoencoderKL  # heavy (seconds to import): only a size left to the model reads it

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


def side_by_side(cfg: EvalConfig, rows: list[dict]):
    """A PIL picture: the first prompts, A's and B's first image side by side."""
    shown = rows[:cfg.picture_prompts]
    return pairs_grid([(str(r["prompt"]), png_image(r["png_a"][0]), png_image(r["png_b"][0])) for r in shown],
                      labels=("A", "B"))


def record(cfg: EvalConfig, result: EvalResult, files: dict[str, bytes], run_id: str | None = None) -> None:
    """The evaluation's MLflow run (or ``run_id``, a sweep trial's): settings, figures, and ``files``
    (name -> content: the report, the table, the picture), sent to the tracking server, not read back
    from the output (which may be on another store)."""
    import mlflow  # heavy (about 1 s to import): only an evaluation that records a run needs it

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
