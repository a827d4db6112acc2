"""The paper's tables in the miniature world, from one command (``jobs/replicate.py``).

One pool of N = 20 (the pool stage, resumable), the world's out-of-distribution "public" set and
its two imported pools of pairs in ``<output>/public`` (for Table 1's public-data rows, when those
trials are run; resumable too), one sweep holding every trial the tables need (trials of the same
training share one adapter, finished trials are not rerun), the agreement of the pool's PickScore
ranking with the world's judge by n (Fig. 5a), and a report in Markdown with a picture per table:
each table in the paper's layout with intervals, the paper's direction beside it, the targets met
or not, and the MLflow runs.

The trials (names as in the report):

* ``hgdpo``: the runbook's defaults (N = 20, loser rank 20, every prompt, lambda_stat 1e4);
* ``n=2``, ``n=5``, ``n=10``: pool size (Table 3); ``l=2``, ``l=10``: loser rank (Table 5);
  ``d=0.1``, ``d=0.5``: dataset size (Table 6), as shares of the pool's prompts;
* ``dpo``: Diffusion-DPO alone; ``dpo-beta4``, ``dpo-beta20``: with beta x4 and x20; ``sft``: the
  noise-prediction loss on the winners (Table 1); ``hgdpo-sampler``: eq. 8 with one step of the
  sampling schedule instead of the training DDPM step (Table 2, with ``dpo`` and ``hgdpo``);
* ``dpo-public``, ``dpo-public-h``: Diffusion-DPO on the world's public set (the paper's Pick-a-Pic
  v2) and on its "(H)" subset, each on its own imported pool, ``<output>/public/pool`` and
  ``<output>/public/pool-h`` (Table 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from hgdpo.config.core import from_dict
from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.infra import storage, tracking
from hgdpo.infra.locations import join
from hgdpo.interchange.config import ImportConfig
from hgdpo.interchange.import_job import import_pairs
from hgdpo.models import loading as models
from hgdpo.models.sampling import decode
from hgdpo.pool import store as pool
from hgdpo.pool.build import build_pool
from hgdpo.pool.build import prepare as prepare_pool
from hgdpo.replication.config import ReplicateConfig
from hgdpo.replication.design import (
    DUELS,
    POOL_SIZES,
    PUBLIC_PAIRS_PER_PROMPT,
    PUBLIC_POOLS,
    PUBLIC_SET,
    trials,
)
from hgdpo.replication.report import write_report
from hgdpo.report.winrates import WinRate, win_rate
from hgdpo.scorers.judge import judge_details
from hgdpo.sweep.config import SweepConfig
from hgdpo.sweep.sweep import collect, sweep
from hgdpo.world.public_set import write_public_set


def sweep_config(cfg: ReplicateConfig, prompts: int, left_out: Collection[str] = ()):
    """The one sweep of every table's (selected) trials but ``left_out``, on ``<output>/pool``, written to
    ``<output>/sweep``."""
    mlflow = {"mlflow_uri": cfg.mlflow_uri} if cfg.mlflow_uri else {}
    chosen = [t for t in trials(prompts, cfg.output) if cfg.selected(t["name"]) and t["name"] not in left_out]
    names = {t["name"] for t in chosen}
    return from_dict(SweepConfig, {
        "name": cfg.name, "pool": join(cfg.output, "pool"), "output": join(cfg.output, "sweep"),
        "train": cfg.train, "evaluate": {**cfg.evaluate, "prompts": cfg.test_prompts}, "trials": chosen,
        "duels": [d for d in DUELS if set(d) <= names], "model": cfg.model, "model_config": cfg.model_config,
        "max_concurrent_trials": cfg.max_concurrent_trials, "mlflow_allow_local": cfg.mlflow_allow_local, **mlflow},
        "replicate")


def public_imports(cfg: ReplicateConfig) -> dict[str, Any]:
    """Trial -> the import (``ImportConfig``) of its public pool, for the selected public trials only (none:
    no public work), each VAE-encoded by the replicate's model."""
    pool_cfg = cfg.stages()[0]
    model = {"model": pool_cfg.model, "model_config": pool_cfg.model_config, "allow_pickle": pool_cfg.allow_pickle}
    return {name: ImportConfig(source=join(cfg.output, "public", PUBLIC_SET), output=join(cfg.output, "public", folder),
                               **model, **settings)
            for name, (folder, settings) in PUBLIC_POOLS.items() if cfg.selected(name)}


def unmade_public_pools(cfg: ReplicateConfig) -> list[str]:
    """The selected public trials whose pool is not complete (a report-only run leaves them out)."""
    return [name for name, imp in public_imports(cfg).items() if pool.state(imp.output).complete is None]


def make_public_pools(cfg: ReplicateConfig, prompts: int, log=print) -> None:
    """The world's public set, ``PUBLIC_PAIRS_PER_PROMPT`` x ``prompts`` pairs, then the selected public
    trials' pools imported from it; both resumable (the set is written atomically, so a file there is whole)."""
    imports = public_imports(cfg)
    if not imports:
        return
    source, pairs = next(iter(imports.values())).source, PUBLIC_PAIRS_PER_PROMPT * prompts
    if storage.is_file(source):
        found = storage.parquet_rows(source)
        if found != pairs:
            raise HgdpoError(f"replicate: {source} holds {found} pairs; the pool's {prompts} prompts need {pairs} "
                             f"({PUBLIC_PAIRS_PER_PROMPT} a prompt): delete {storage.parent(source)} (the set and "
                             f"its pools) and rerun")
        log(f"replicate: the public set {source} is already complete ({pairs} pairs)")
    else:
        log(f"replicate: Table 1: writing the world's public set, {pairs} pairs")
        write_public_set(source, pairs, log=log)
    for imp in imports.values():
        import_pairs(imp, log)


def pool_agreement(uri: str, model: str = "embedded", sizes: tuple[int, ...] = POOL_SIZES, *, resamples: int = 2000,
                   seed: int = 0) -> dict[int, Any]:
    """Fig. 5a in the world: for each n, the judge's win rate of the PickScore winner of the first n
    images of every pool prompt over their PickScore loser (fewer unmet constraints wins, equal
    counts tie), with a bootstrap interval over prompts. Read part by part: all N latents of one
    part are decoded at a time."""
    pipe = models.load_pipeline(model)
    winners: dict[int, list[float]] = {n: [] for n in sizes}
    losers: dict[int, list[float]] = {n: [] for n in sizes}
    groups: list[int] = []
    for table in pool.read_parts(uri, columns=["prompt", "scores", "latents"]):
        latents = pool.latents_of(table)
        for prompt, scores, images in zip(table.column("prompt").to_pylist(), table.column("scores").to_pylist(),
                                          latents):
            if len(scores) < max(sizes):
                raise ConfigError(f"replicate.pool: {uri} keeps {len(scores)} latents a prompt; Fig. 5a needs "
                                  f"{max(sizes)} (pool keep: all)")
            pixels = decode(pipe, torch.from_numpy(images.astype(np.float32)))
            violation = np.array([judge_details(image, prompt).violation for image in pixels])
            for n in sizes:
                first = np.asarray(scores[:n])
                winners[n].append(-violation[int(first.argmax())])
                losers[n].append(-violation[int(first.argmin())])
            groups.append(len(groups))
    return {n: win_rate(np.array(winners[n]), np.array(losers[n]), np.array(groups), resamples=resamples, seed=seed)
            for n in sizes}


def replicate(cfg: ReplicateConfig, log=print) -> str:
    """Pool, sweep, Fig. 5a, report: every stage resumable. Returns the report's location."""
    storage.check_writable(cfg.output, "replicate.output")
    tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "replicate.mlflow_uri")
    pool_cfg = cfg.stages()[0]
    items, _ = prepare_pool(pool_cfg, log)
    prompts = len(items)
    sweep_cfg = sweep_config(cfg, prompts)  # every trial's checks before the pool is made
    if cfg.run:
        build_pool(pool_cfg, log)
        make_public_pools(cfg, prompts, log)
        result = sweep(sweep_cfg, log)
    else:
        unmade = unmade_public_pools(cfg)
        if unmade:
            log(f"replicate: not reported: {', '.join(unmade)} (their public pools are not made yet)")
        result = collect(sweep_config(cfg, prompts, unmade))
    agreement_file = storage.join(cfg.output, "agreement.json")
    if storage.is_file(agreement_file):
        agreement = {int(n): WinRate(**r) for n, r in storage.read_json(agreement_file, "agreement").items()}
    else:
        log("replicate: Fig. 5a: decoding and judging every image of the pool")
        agreement = pool_agreement(pool_cfg.output, cfg.model)
        storage.write_json(agreement_file, {n: dataclasses.asdict(r) for n, r in agreement.items()})
    return write_report(cfg, result, agreement, prompts, log)
