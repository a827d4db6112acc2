"""The evaluation's Ray Data stream: prompts -> ``GenerateAB`` actors -> ``ScoreAB`` actors -> the driver.

Per prompt, ``GenerateAB`` makes A's and B's images from the same seeds (one pipeline serves both
when they share a base model; one side only when the other's rows come from a baseline cache), and
``ScoreAB`` rates every image with every scorer, takes each image's mean H, S and V, and encodes it
as PNG. The driver receives only scores, colours and PNG bytes (``generate_and_score``).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import ray.data

from hgdpo import prompts as prompt_io
from hgdpo.config.core import from_dict, to_dict
from hgdpo.evaluate.config import EvalConfig
from hgdpo.evaluate.scores_file import SIDES
from hgdpo.infra.progress import SteadyRate, rate_text
from hgdpo.infra.quiet import quiet_libraries, show_progress
from hgdpo.infra.raycluster import TorchThread, ensure_ray
from hgdpo.models import lan
from hgdpo.models import loading as models
from hgdpo.models.sampling import image_seeds, native_size, resolve_device_dtype, set_sampler, set_threads
from hgdpo.pool.store import png_bytes
from hgdpo.report.winrates import mean_hsv
from hgdpo.scorers.base import ScorerSpec
from hgdpo.scorers.registry import load_scorer


def scorer_specs(cfg: EvalConfig) -> list[ScorerSpec]:
    """The scorers of ``cfg``, each with its model and processor."""
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
        self.cfg = cfg = from_dict(EvalConfig, config)
        self.sides = tuple(sides)
        quiet_libraries()
        set_threads(cfg.scorer_cpus)
        device, _ = resolve_device_dtype(cfg.dtype)
        self.scorers = [load_scorer(spec, allow_pickle=cfg.allow_pickle, device=device) for spec in scorer_specs(cfg)]

    def _rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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



def generate_and_score(cfg: EvalConfig, items: list[prompt_io.Prompt], log=print, sides: tuple[str, ...] = SIDES):
    """Run the Ray Data stream for ``sides``; yield each prompt's finished row (driver side) as it arrives."""
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

