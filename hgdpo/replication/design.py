"""The replication's design: the trials each of the paper's tables needs, their names, and the duels between them.

Shared by the job (``hgdpo.replication.replicate``) and its report (``hgdpo.replication.report``).
"""

from __future__ import annotations

from typing import Any

from hgdpo.infra.locations import join

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
