"""Choosing preference pairs when the pool is read, and the order training visits them in.

The pool keeps all N scores (and by default all N latents), so the paper's ablations are made
here, not by new pools: pool size n (rank only the first n seeds, Table 3), loser rank l (the
l-th best of those n, Table 5) and dataset size D (the first D prompts, Table 6).

Data order is independent of the number of workers: the D pairs are dealt into
``data_shards`` fixed shards (pair i -> shard i mod S); every epoch each shard is shuffled by its
own seed, and optimizer step k takes the next ``global_batch / S`` pairs of every shard. A worker
owns the shards ``v`` with ``v mod workers == rank``, so one worker and two see the same global
batches, and a resumed run continues the same sequence from its step number alone.

The selected pairs are written once per selection as a pair dataset that the workers read record by
record (``hgdpo.train.pair_data``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hgdpo.errors import HgdpoError


@dataclass(frozen=True)
class PairPlan:
    """What the trainer reads from a pool: resolved n, loser rank and D, and the shard layout."""

    pool_size: int
    loser_rank: int
    dataset_size: int
    data_shards: int
    global_batch: int
    seed: int
    selection: str = "rank"  # the objective's pair rule (hgdpo.objectives.base.Objective.selection)
    margin: float = 0.0  # ospo: the least margin an original must pass every question by

    @property
    def per_shard(self) -> int:
        return self.global_batch // self.data_shards

    def steps_per_epoch(self) -> int:
        return (self.dataset_size // self.data_shards) // self.per_shard

    def shard_of(self, index: int) -> int:
        return index % self.data_shards

    def worker_shards(self, rank: int, workers: int) -> list[int]:
        """The shards worker ``rank`` of ``workers`` owns: ``v mod workers == rank``."""
        return [v for v in range(self.data_shards) if v % workers == rank]

    def step_indices(self, step: int, shard: int) -> np.ndarray:
        """Pair indices (prompt positions < D) of ``shard`` used at optimizer ``step``."""
        spe = self.steps_per_epoch()
        epoch, k = divmod(step, spe)
        members = np.arange(shard, self.dataset_size, self.data_shards)
        order = np.random.default_rng([self.seed, epoch, shard]).permutation(len(members))
        return members[order[k * self.per_shard: (k + 1) * self.per_shard]]


def plan(meta: dict, *, pool_size: int | None, loser_rank: int | None, dataset_size: int | None,
         data_shards: int, global_batch: int, seed: int, selection: str = "rank", margin: float = 0.0) -> PairPlan:
    """Resolve the ablation settings against a pool's metadata; refuse what the pool cannot give.

    ``selection`` names the objective's pair rule (``hgdpo.objectives``: ``rank`` by the pool's scores,
    ``ospo`` the self-judge's pairs, ...); a rule that does not give one pair per prompt makes a dataset of
    the pairs it takes from the first D prompts, renumbered."""
    big_n = int(meta["images_per_prompt"])
    n = pool_size if pool_size is not None else big_n
    if n > big_n:
        raise HgdpoError(f"train.pool_size: {n} is larger than the pool's N={big_n} images per prompt")
    rank = loser_rank if loser_rank is not None else n
    if not 2 <= rank <= n:
        raise HgdpoError(f"train.loser_rank: must be between 2 and pool_size={n} (got {rank})")
    total = int(meta["num_prompts"])
    d = dataset_size if dataset_size is not None else total
    if d > total:
        raise HgdpoError(f"train.dataset_size: {d} prompts asked, but the pool has {total}")
    keep = meta["config"]["keep"]
    pool_rank = meta["fingerprint"]["loser_rank"]
    if keep == "pair" and (n != big_n or rank != pool_rank):
        raise HgdpoError(
            f"train.pool_size/loser_rank: the pool keeps only its winner and loser latents (keep: pair, "
            f"N={big_n}, loser rank {pool_rank}); n={n}, loser rank {rank} need a pool built with keep: all")
    p = PairPlan(n, rank, d, data_shards, global_batch, seed, selection, margin)
    if p.steps_per_epoch() < 1:
        raise HgdpoError(f"train.dataset_size: {d} prompts in {data_shards} shards cannot fill one global batch "
                         f"of {global_batch}; lower global_batch or data_shards")
    return p
