"""The paper's tables in the miniature world, from one command (``jobs/replicate.py``).

One pool of N = 20 (the pool stage, resumable), one sweep holding every trial the tables need
(trials of the same training share one adapter, finished trials are not rerun), the agreement of
the pool's PickScore ranking with the world's judge by n (Fig. 5a), and a report in Markdown with a
picture per table: each table in the paper's layout with intervals, the paper's direction beside
it, the targets met or not, and the MLflow runs.

The trials (names as in the report):

* ``hgdpo``: the runbook's defaults (N = 20, loser rank 20, every prompt, lambda_stat 1e4);
* ``n=2``, ``n=5``, ``n=10``: pool size (Table 3); ``l=2``, ``l=10``: loser rank (Table 5);
  ``d=0.1``, ``d=0.5``: dataset size (Table 6), as shares of the pool's prompts;
* ``dpo``: Diffusion-DPO alone; ``dpo-beta4``, ``dpo-beta20``: with beta x4 and x20; ``sft``: the
  noise-prediction loss on the winners (Table 1); ``hgdpo-sampler``: eq. 8 with one step of the
  sampling schedule instead of the training DDPM step (Table 2, with ``dpo`` and ``hgdpo``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hgdpo.config import doc
from hgdpo.errors import ConfigError
from hgdpo.run import RunConfig


@dataclass
class ReplicateConfig(RunConfig):
    """The world's versions of the paper's Tables 1, 2, 3, 5 and 6 (and Fig. 5a) on one pool."""

    SECTION = "replicate"

    output: str = doc("Folder or storage URI of the replication: pool/, sweep/, agreement.json and (by default) "
                      "the report are written inside it.")
    name: str = doc("Name of the replication's sweep (its MLflow parent run).", "replicate")
    report: str | None = doc("Where the Markdown report is written (its pictures beside it); default "
                             "<output>/replication.md.", None)
    max_concurrent_trials: int | None = doc("Trials at once (default: as many as fit the cluster).", None)
    notes: str | None = doc("A Markdown file of what people read in the measurements, included in the report "
                            "under 'What the measurements say' (the rest of the report is made from the runs).", None)
    run: bool = doc("Build the pool and run the unfinished trials; false: only write the report from what is "
                    "finished (the rest marked unfinished).", True)
    only: list[str] = doc("Run only these trials (names as in the report, e.g. [hgdpo, n=2]); default: all. "
                          "The report marks what the missing trials would have measured as '-'.", [])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool.get("images_per_prompt", 20) < max(POOL_SIZES):
            raise ConfigError(f"replicate.pool.images_per_prompt: the tables need N >= {max(POOL_SIZES)}")
        if self.notes is not None and not Path(self.notes).is_file():
            raise ConfigError(f"replicate.notes: {self.notes} is not a file")
        known = [t["name"] for t in trials(1)]
        for i, name in enumerate(self.only):
            if name not in known:
                raise ConfigError(f"replicate.only[{i}]: no trial {name!r}; trials: {', '.join(known)}")


POOL_SIZES = (2, 5, 10, 20)
LOSER_RANKS = (2, 10, 20)
SHARES = (0.1, 0.5, 1.0)  # of the pool's prompts
BETA = 2500.0  # the paper's, in the diffusers convention (DESIGN.md)


def trials(prompts: int) -> list[dict[str, Any]]:
    """The sweep's trials for a pool of ``prompts`` prompts, in the order they run: Table 3's, then
    Tables 2 and 1's, then the rest of Tables 5 and 6 (so a run cut short has the main tables)."""
    out = [{"name": "hgdpo"}]
    out += [{"name": f"n={n}", "pool_size": n} for n in POOL_SIZES[:-1]]
    out += [{"name": "dpo", "objective": "dpo", "lambda_stat": 0},
            {"name": "hgdpo-sampler", "stat_step": "sampler"},
            {"name": "dpo-beta20", "objective": "dpo", "lambda_stat": 0, "beta": 20 * BETA},
            {"name": "sft", "objective": "sft", "lambda_stat": 0},
            {"name": "dpo-beta4", "objective": "dpo", "lambda_stat": 0, "beta": 4 * BETA}]
    for i in range(len(LOSER_RANKS) - 1):
        out.append({"name": f"l={LOSER_RANKS[i]}", "loser_rank": LOSER_RANKS[i]})
        out.append({"name": f"d={SHARES[i]:g}", "dataset_size": max(1, round(SHARES[i] * prompts))})
    return out


def name_of(kind: str, value: Any) -> str:
    """The trial of an ablation's value: the largest value is the ``hgdpo`` trial itself."""
    largest = {"n": POOL_SIZES[-1], "l": LOSER_RANKS[-1], "d": SHARES[-1]}[kind]
    if value == largest:
        return "hgdpo"
    return f"{kind}={value:g}"


DUELS = ([["hgdpo", "n=2"], ["n=5", "n=2"], ["n=10", "n=5"], ["hgdpo", "n=10"], ["hgdpo", "l=2"],
          ["hgdpo", "l=10"], ["hgdpo", "d=0.1"], ["hgdpo", "d=0.5"], ["hgdpo", "sft"], ["hgdpo", "dpo-beta4"],
          ["hgdpo", "dpo-beta20"], ["hgdpo", "dpo"], ["hgdpo-sampler", "hgdpo"], ["hgdpo-sampler", "dpo"]])


def sweep_config(cfg: ReplicateConfig, prompts: int):
    """The one sweep of every table's trials, on ``<output>/pool``, written to ``<output>/sweep``."""
    from hgdpo.config import from_dict
    from hgdpo.storage import join
    from hgdpo.sweep_config import SweepConfig

    mlflow = {"mlflow_uri": cfg.mlflow_uri} if cfg.mlflow_uri else {}
    chosen = [t for t in trials(prompts) if not cfg.only or t["name"] in cfg.only]
    names = {t["name"] for t in chosen}
    return from_dict(SweepConfig, {
        "name": cfg.name, "pool": join(cfg.output, "pool"), "output": join(cfg.output, "sweep"),
        "train": cfg.train, "evaluate": {**cfg.evaluate, "prompts": cfg.test_prompts}, "trials": chosen,
        "duels": [d for d in DUELS if set(d) <= names], "model": cfg.model, "model_config": cfg.model_config,
        "max_concurrent_trials": cfg.max_concurrent_trials, "mlflow_allow_local": cfg.mlflow_allow_local, **mlflow},
        "replicate")


def pool_agreement(uri: str, model: str = "embedded", sizes: tuple[int, ...] = POOL_SIZES, *, resamples: int = 2000,
                   seed: int = 0) -> dict[int, Any]:
    """Fig. 5a in the world: for each n, the judge's win rate of the PickScore winner of the first n
    images of every pool prompt over their PickScore loser (fewer unmet constraints wins, equal
    counts tie), with a bootstrap interval over prompts. Read part by part: all N latents of one
    part are decoded at a time."""
    import torch

    from hgdpo import models, pool
    from hgdpo.sampling import decode
    from hgdpo.winrates import win_rate
    from hgdpo.world.judge import judge_details

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
    from hgdpo import storage, tracking
    from hgdpo.pool_builder import build_pool, prepare as prepare_pool
    from hgdpo.sweep import collect, sweep
    from hgdpo.winrates import WinRate

    storage.check_writable(cfg.output, "replicate.output")
    tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "replicate.mlflow_uri")
    pool_cfg = cfg.stages()[0]
    items, _ = prepare_pool(pool_cfg, log)
    prompts = len(items)
    sweep_cfg = sweep_config(cfg, prompts)  # every trial's checks before the pool is made
    if cfg.run:
        build_pool(pool_cfg, log)
        result = sweep(sweep_cfg, log)
    else:
        result = collect(sweep_cfg)
    agreement_file = storage.join(cfg.output, "agreement.json")
    if storage.is_file(agreement_file):
        agreement = {int(n): WinRate(**r) for n, r in storage.read_json(agreement_file, "agreement").items()}
    else:
        log("replicate: Fig. 5a: decoding and judging every image of the pool")
        agreement = pool_agreement(pool_cfg.output, cfg.model)
        storage.write_json(agreement_file, {n: dataclasses.asdict(r) for n, r in agreement.items()})
    from hgdpo.replication_report import write_report

    return write_report(cfg, result, agreement, prompts, log)
