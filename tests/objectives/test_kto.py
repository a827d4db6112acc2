"""Diffusion-KTO: its loss against values written out by hand, its labels, its pairs from a pool, its settings."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.objectives.kto import KTO, kto_loss, utility_labels
from hgdpo.train.config import TrainConfig


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_the_loss_is_each_images_distance_from_full_value_against_the_reference_point():
    # Four images: two desirable, two undesirable. Rewards r = ref - policy: 0.3, -0.1, 0.2, -0.2; mean 0.05 = z.
    policy = torch.tensor([0.2, 0.6, 0.3, 0.7], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    loss, stats = kto_loss(policy, ref, desirable, beta=2.0, lambda_d=1.0, lambda_u=3.0)
    z = 0.05
    values = [sigmoid(2 * (0.3 - z)), sigmoid(2 * (-0.1 - z)), sigmoid(-2 * (0.2 - z)), sigmoid(-2 * (-0.2 - z))]
    want = (1 * (1 - values[0]) + 1 * (1 - values[1]) + 3 * (1 - values[2]) + 3 * (1 - values[3])) / 4
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(stats["kl"]) == pytest.approx(z) and float(stats["accuracy"]) == 0.5  # images 0 and 3 are right
    assert float(stats["reward_d"]) == pytest.approx(0.1) and float(stats["reward_u"]) == pytest.approx(0.0)
    loss.backward()
    # Lowering a desirable image's error lowers the loss; lowering an undesirable one's raises it.
    assert policy.grad[0] > 0 and policy.grad[1] > 0 and policy.grad[2] < 0 and policy.grad[3] < 0


def test_the_reference_point_is_floored_at_zero_and_held_constant():
    policy = torch.tensor([0.6, 0.7], requires_grad=True)
    ref = torch.tensor([0.5, 0.5], requires_grad=True)
    loss, stats = kto_loss(policy, ref, torch.tensor([True, False]), beta=1.0)
    assert float(stats["kl"]) == 0.0  # the mean reward is negative
    want = ((1 - sigmoid(-0.1)) + (1 - sigmoid(0.2))) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert ref.grad is None  # the reference is a constant of the loss
    # At the start (policy == reference) every image is at the reference point: the loss is 1/2 of its weight.
    same = torch.tensor([0.4, 0.4, 0.4])
    at_start, stats = kto_loss(same, same, torch.tensor([True, False, False]), beta=2500.0, lambda_d=2.0)
    assert float(at_start) == pytest.approx((2 * 0.5 + 0.5 + 0.5) / 3) and float(stats["accuracy"]) == 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="beta must be positive"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), beta=0.0)
    with pytest.raises(ValueError, match="one shape"):
        kto_loss(torch.zeros(2), torch.zeros(3), torch.tensor([True, False]), beta=1.0)


def test_images_above_the_median_are_desirable_below_undesirable_and_at_it_neither():
    good, bad = utility_labels([0.1, 0.5, 0.3, 0.9])  # median 0.4
    assert good.tolist() == [3, 1] and bad.tolist() == [2, 0]  # each best first
    good, bad = utility_labels([3.0, 1.0, 2.0])  # the median image (2.0) is neither
    assert good.tolist() == [0] and bad.tolist() == [1]
    good, bad = utility_labels([1.0, 1.0, 1.0, 1.0])  # all at the median: no label
    assert good.size == 0 and bad.size == 0


def test_a_prompt_gives_a_record_per_desirable_and_undesirable_image_and_uses_all_of_them():
    scores = [[0.1, 0.5, 0.3, 0.9, 0.0, 0.2], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [7.0, 7.0, 7.0, 7.0, 7.0, 7.0]]
    small = pa.table({"scores": scores})
    chosen = KTO.choose(small, np.array([0, 1, 2]), pool_size=4, loser_rank=4, margin=0.0)
    # Only the first n = 4 images count; prompt 2 is a tie everywhere and gives nothing.
    assert chosen.rows.tolist() == [0, 0, 1, 1]
    assert chosen.pairs == [(3, 2), (1, 0), (3, 1), (2, 0)]
    assert chosen.scores == [(0.9, 0.3), (0.5, 0.1), (4.0, 2.0), (3.0, 1.0)]
    assert sorted(i for pair in chosen.pairs[:2] for i in pair) == [0, 1, 2, 3]  # every image of prompt 0 teaches


def test_its_settings_are_checked_and_refused_for_other_objectives():
    cfg = TrainConfig(pool="p", output="o", objective="kto", kto_lambda_u=2.0, lambda_stat=100.0)
    assert cfg.kto_lambda_u == 2.0 and cfg.stat_weight() == 100.0  # statistic matching regularises kto too
    assert TrainConfig(pool="p", output="o", objective="kto").stat_weight() == 0.0
    with pytest.raises(ConfigError, match=r"train.kto_lambda_d: a setting of the kto objective, which objective dpo"):
        TrainConfig(pool="p", output="o", objective="dpo", kto_lambda_d=2.0)
    with pytest.raises(ConfigError, match="train.kto_lambda_u: must be positive"):
        TrainConfig(pool="p", output="o", objective="kto", kto_lambda_u=0.0)
    with pytest.raises(ConfigError, match="train.loser_rank: kto labels every image"):
        TrainConfig(pool="p", output="o", objective="kto", loser_rank=2)


def test_a_pool_that_keeps_only_winner_and_loser_is_refused():
    objective = KTO(TrainConfig(pool="p", output="o", objective="kto"))
    objective.check_pool({"config": {"keep": "all", "output": "runs/p"}})
    with pytest.raises(HgdpoError, match=r"train.objective: kto learns from every image .* \(keep: pair\)"):
        objective.check_pool({"config": {"keep": "pair", "output": "runs/p"}})
