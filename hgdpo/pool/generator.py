"""The pool's generator actor: what it makes of each prompt.

``RowMaker`` loads the model and the scorer once; per prompt it samples the N images, scores them
(float32, as the pool stores them), ranks them and keeps the latents the pool keeps, with the winner's
and loser's pixels beside them (and OSPO's negatives and self-judge scores with ``hard_negatives``).
It runs as a Ray Data actor and in the plain loop (``hgdpo.pool.build``); the rows it makes are
written by ``hgdpo.pool.rows.write_rows``.
"""

from __future__ import annotations

import json

import numpy as np

from hgdpo.config.core import from_dict
from hgdpo.infra.quiet import quiet_libraries
from hgdpo.infra.raycluster import TorchThread
from hgdpo.models import loading as models
from hgdpo.models.sampling import (
    generate,
    image_seeds,
    native_size,
    resolve_device_dtype,
    sample_latents,
    set_sampler,
    set_threads,
    setup_inference,
)
from hgdpo.pool import ospo
from hgdpo.pool.config import PoolConfig
from hgdpo.pool.rows import columns
from hgdpo.scorers.base import rank
from hgdpo.scorers.registry import load_scorer


class RowMaker:
    """Makes pool rows: loads the model and the scorer once, then per prompt its N images, their
    scores, the ranking, and what the pool keeps. A Ray Data actor (``__call__`` on batches of
    prompts) and the plain loop's worker (``make``). As an actor, its torch work runs on a
    ``TorchThread`` (loading and every batch on one thread of its own)."""

    def __init__(self, config: dict, actor: bool = True, log=print):
        self.torch_thread = TorchThread("rowmaker-torch") if actor else None
        if self.torch_thread is not None:
            self.torch_thread.run(self._load, config, actor, log)
        else:
            self._load(config, actor, log)

    def _load(self, config: dict, actor: bool, log) -> None:
        self.cfg = cfg = from_dict(PoolConfig, config)
        quiet_libraries()
        if actor:  # the plain loop keeps torch's threads
            set_threads(cfg.generator_cpus)
        device, dtype = resolve_device_dtype(cfg.dtype)
        self.pipe = models.load_pipeline(cfg.model, model_config=cfg.model_config,
                                         allow_pickle=cfg.allow_pickle, dtype=dtype, device=device)
        set_sampler(self.pipe, cfg.sampler)
        self.applied = setup_inference(self.pipe, attention=cfg.attention, channels_last=cfg.channels_last,
                                       compile_unet=cfg.compile, log=log)
        self.scorer = load_scorer(cfg.scorer_spec(), allow_pickle=cfg.allow_pickle, device=device, dtype=dtype,
                                  attention="sdpa" if cfg.attention == "sdpa" else "eager")
        native_w, native_h = native_size(self.pipe)
        self.width, self.height = cfg.width or native_w, cfg.height or native_h
        self.loser_rank = cfg.resolved_loser_rank()
        if cfg.hard_negatives:  # the self-judge noises images as training does
            from diffusers import DDPMScheduler

            self.noise_schedule = DDPMScheduler.from_config(self.pipe.scheduler.config)

    def make(self, prompt_id: str, prompt_index: int, text: str) -> dict:
        """One prompt's row (``ROW_COLUMNS``), the winner's and loser's images as uint8 pixels."""
        cfg = self.cfg
        seeds = image_seeds(cfg.seed, prompt_id, cfg.images_per_prompt)
        latents, images = generate(self.pipe, text, seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                   width=self.width, height=self.height, negative_prompt=cfg.negative_prompt,
                                   batch=cfg.generator_batch, vae_batch=cfg.vae_batch)
        scores = self.scorer.rank_scores(text, images, batch=cfg.vae_batch)  # float32, as the pool stores them
        order = rank(scores)
        w, l = int(order[0]), int(order[self.loser_rank - 1])
        keep = np.arange(len(seeds), dtype=np.int32) if cfg.keep == "all" else np.asarray([w, l], np.int32)
        row = {"prompt_id": prompt_id, "prompt_index": int(prompt_index), "prompt": text,
               "seeds": np.asarray(seeds, dtype=np.int64), "scores": scores, "rank": order, "winner": w,
               "loser": l, "latent_index": keep, "latents": latents[keep], "pixels_w": images[w], "pixels_l": images[l]}
        if cfg.hard_negatives:
            row.update(self.hard_negatives(prompt_id, text, seeds, latents))
        return row

    def hard_negatives(self, prompt_id: str, text: str, seeds: list[int], latents: np.ndarray) -> dict:
        """OSPO's columns of a row: the negatives' latents after the originals', the questions, the self-judge's
        scores of all 2N images (``hgdpo.pool.ospo``)."""
        import torch

        cfg = self.cfg
        questions = ospo.questions(text, cfg.hard_negatives, cfg.seed, cfg.self_judge_questions)
        if questions:
            negatives = sample_latents(self.pipe, questions[0], seeds, steps=cfg.steps,
                                       guidance_scale=cfg.guidance_scale, width=self.width, height=self.height,
                                       negative_prompt=cfg.negative_prompt, batch=cfg.generator_batch)
            negatives = negatives.to(torch.float16).cpu().numpy()
        else:  # nothing to perturb: no pair for this prompt (the self-scores are NaN)
            negatives = np.zeros_like(latents)
        both = np.concatenate([latents, negatives])  # (2N, C, h, w)
        self_scores, self_least = ospo.self_judge(self.pipe, self.noise_schedule, prompt_id, text, questions, both,
                                                  cfg.seed)
        # The questions travel as one JSON string (a ragged list of strings per row would not cross Ray Data
        # as a column); the pool stores them as a list column.
        return {"latent_index": np.arange(len(both), dtype=np.int32), "latents": both,
                "questions": json.dumps(questions),
                "self_scores": self_scores, "self_least": self_least}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.torch_thread is not None:
            return self.torch_thread.run(self._rows, batch)
        return self._rows(batch)

    def _rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.make(str(pid), int(index), str(text))
                for pid, index, text in zip(batch["prompt_id"], batch["prompt_index"], batch["prompt"])]
        return columns(rows)
