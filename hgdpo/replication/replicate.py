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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hgdpo.config.core import doc
from hgdpo.errors import ConfigError
from hgdpo.run import RunConfig


@dataclass
class ReplicateConfig(RunConfig):
    """The world's versions of the paper's Tables 1, 2, 3, 5 and 6 (and Fig. 5a) on one pool."""

    SECTION = "replicate"

    output: str = doc("Folder or storage URI of the replication: pool/, public/ (Table 1's public set and its "
                      "pools), sweep/, agreement.json and (by default) the report are written inside it.")
    name: str = doc("Name of the replication's sweep (its MLflow parent run).", "replicate")
    report: str | None = doc("Where the Markdown report is written (its pictures beside it); default "
                             "<output>/replication.md.", None)
    max_concurrent_trials: int | None = doc("Trials at once (default: as many as fit the cluster).", None)
    notes: str | None = doc("A Markdown file of what people read in the measurements, included in the report "
                            "under 'What the measurements say' (the rest of the report is made from the runs).", None)
    run: bool = doc("Build the pools and run the unfinished trials; false: only write the report from what is "
                    "finished (the rest marked unfinished).", True)
    only: list[str] = doc("Run only these trials (names as in the report, e.g. [hgdpo, n=2]); default: all. "
                          "The report marks what the missing trials would have measured as '-'.", [])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool.get("images_per_prompt", 20) < max(POOL_SIZES):
            raise ConfigError(f"replicate.pool.images_per_prompt: the tables need N >= {max(POOL_SIZES)}")
        if self.notes is not None and not Path(self.notes).is_file():
            raise ConfigError(f"replicate.notes: {self.notes} is not a file")
        known = [t["name"] for t in trials(1, self.output)]
        for i, name in enumerate(self.only):
            if name not in known:
                raise ConfigError(f"replicate.only[{i}]: no trial {name!r}; trials: {', '.join(known)}")

    def selected(self, name: str) -> bool:
        """Whether trial ``name`` is run (and reported): every trial unless ``only`` names some."""
        return not self.only or name in self.only


POOL_SIZES = (2, 5, 10, 20)
LOSER_RANKS = (2, 10, 20)
SHARES = (0.1, 0.5, 1.0)  # of the pool's prompts
BETA = 2500.0  # the paper's, in the diffusers convention (docs/training.md)

# Table 1's public-data trials: each trains on its own pool, <output>/public/<folder>, imported from the world's
# public set with these import settings. The world's subjects are its shapes, so its "(H)" (people) subset is
# the pairs whose caption names one (as in sweeps/public_vs_own.yaml).
PUBLIC_POOLS = {"dpo-public": ("pool", {}),
                "dpo-public-h": ("pool-h", {"subset": "people", "people_keywords": ["circle", "square", "triangle"]})}
PUBLIC_SET = "world-public.parquet"
# Public-set pairs per prompt of the own pool. The paper's public sets are far larger than its own pool;
# 4 pairs a prompt (1,200 for the world's 300 prompts) keeps the world's (H) subset (about 35% of the pairs:
# public_set's subject_share) larger than the own pool too, while the set and its imports take minutes on
# two CPU cores, little next to a trial. Every trial takes the same training steps, so a larger set only
# adds variety, not steps.
PUBLIC_PAIRS_PER_PROMPT = 4


def trials(prompts: int, output: str) -> list[dict[str, Any]]:
    """The sweep's trials for a pool of ``prompts`` prompts in replication ``output``, in the order they
    run: Table 3's, then Tables 2 and 1's, then the rest of Tables 5 and 6 (so a run cut short has the
    main tables)."""
    from hgdpo.infra.storage import join

    out = [{"name": "hgdpo"}]
    out += [{"name": f"n={n}", "pool_size": n} for n in POOL_SIZES[:-1]]
    out += [{"name": "dpo", "objective": "dpo", "lambda_stat": 0},
            {"name": "hgdpo-sampler", "stat_step": "sampler"},
            {"name": "dpo-beta20", "objective": "dpo", "lambda_stat": 0, "beta": 20 * BETA},
            {"name": "sft", "objective": "sft", "lambda_stat": 0},
            {"name": "dpo-beta4", "objective": "dpo", "lambda_stat": 0, "beta": 4 * BETA}]
    out += [{"name": name, "objective": "dpo", "lambda_stat": 0, "pool": join(output, "public", folder)}
            for name, (folder, _) in PUBLIC_POOLS.items()]
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
          ["hgdpo", "dpo-beta20"], ["hgdpo", "dpo"], ["hgdpo", "dpo-public"], ["hgdpo", "dpo-public-h"],
          ["hgdpo-sampler", "hgdpo"], ["hgdpo-sampler", "dpo"]])


def sweep_config(cfg: ReplicateConfig, prompts: int, left_out: Collection[str] = ()):
    """The one sweep of every table's (selected) trials but ``left_out``, on ``<output>/pool``, written to
    ``<output>/sweep``."""
    from hgdpo.config.core import from_dict
    from hgdpo.infra.storage import join
    from hgdpo.sweep.config import SweepConfig

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
    from hgdpo.infra.storage import join
    from hgdpo.interchange.config import ImportConfig

    pool_cfg = cfg.stages()[0]
    model = {"model": pool_cfg.model, "model_config": pool_cfg.model_config, "allow_pickle": pool_cfg.allow_pickle}
    return {name: ImportConfig(source=join(cfg.output, "public", PUBLIC_SET), output=join(cfg.output, "public", folder),
                               **model, **settings)
            for name, (folder, settings) in PUBLIC_POOLS.items() if cfg.selected(name)}


def unmade_public_pools(cfg: ReplicateConfig) -> list[str]:
    """The selected public trials whose pool is not complete (a report-only run leaves them out)."""
    from hgdpo.pool import store as pool

    return [name for name, imp in public_imports(cfg).items() if pool.state(imp.output).complete is None]


def make_public_pools(cfg: ReplicateConfig, prompts: int, log=print) -> None:
    """The world's public set, ``PUBLIC_PAIRS_PER_PROMPT`` x ``prompts`` pairs, then the selected public
    trials' pools imported from it; both resumable (the set is written atomically, so a file there is whole)."""
    from hgdpo.errors import HgdpoError
    from hgdpo.infra import storage
    from hgdpo.interchange.interchange import import_pairs
    from hgdpo.world.public_set import write_public_set

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
    import torch

    from hgdpo.models import loading as models
    from hgdpo.models.sampling import decode
    from hgdpo.pool import store as pool
    from hgdpo.report.winrates import win_rate
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
    from hgdpo.infra import storage, tracking
    from hgdpo.pool.build import build_pool
    from hgdpo.pool.build import prepare as prepare_pool
    from hgdpo.report.winrates import WinRate
    from hgdpo.sweep.sweep import collect, sweep

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
    from hgdpo.replication.report import write_report

    return write_report(cfg, result, agreement, prompts, log)
