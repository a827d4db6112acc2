"""The objective protocol: every registered objective keeps it, and the training step calls an objective
without knowing its name."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from hgdpo.config.reference import markdown_table
from hgdpo.errors import ConfigError
from hgdpo.models import loading as models
from hgdpo.models.lora import add_lora
from hgdpo.objectives.base import Objective, Predictions
from hgdpo.objectives.registry import OBJECTIVES, by_selection, owner
from hgdpo.sweep.config import TRAIN_PARAMETERS
from hgdpo.train import step as train_step
from hgdpo.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_declares_its_settings_where_the_config_the_sweep_and_the_reference_find_them(name):
    objective = OBJECTIVES[name]
    assert objective.name == name and objective.summary and issubclass(objective, Objective)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in objective.own_fields():
        assert f.name.startswith(f"{name}_"), f"{f.name}: an objective's keys carry its name"
        assert f.name in fields and f.metadata.get("doc") and owner(f.name) == name
        assert f.name in TRAIN_PARAMETERS  # a sweep may vary it
    assert by_selection(objective.selection).selection == objective.selection
    assert objective.per_prompt in ("one", "at most one", "many")
    assert f"{name}: " in fields["objective"].metadata["doc"]
    settings = (REPO / "docs" / "settings.md").read_text()
    assert markdown_table(TrainConfig) in settings  # the reference lists the objective and its settings


def test_a_setting_no_objective_uses_is_refused_by_name():
    with pytest.raises(ConfigError, match="train.focus_alpha_d: a setting of the focus objective, which objective "
                                          "ospo does not use"):
        TrainConfig(pool="p", output="o", objective="ospo", focus_alpha_d=2.0)
    with pytest.raises(ConfigError, match="train.ospo_alpha: a setting of the ospo objective"):
        TrainConfig(pool="p", output="o", objective="hgdpo", ospo_alpha=2.0)
    with pytest.raises(ConfigError, match="train.lambda_stat: objective sft takes no statistic matching"):
        TrainConfig(pool="p", output="o", objective="sft", lambda_stat=10000.0)
    with pytest.raises(ConfigError, match="train.beta: objective sft does not use it"):
        TrainConfig(pool="p", output="o", objective="sft", beta=5000.0)
    with pytest.raises(ConfigError, match="train.stat_step: statistic matching is off"):
        TrainConfig(pool="p", output="o", objective="dpo", stat_step="sampler")
    # lambda_stat: 0 says "off" for any objective (as the paper's ablation sweeps write it)
    assert TrainConfig(pool="p", output="o", objective="sft", lambda_stat=0).stat_weight() == 0.0
    assert TrainConfig(pool="p", output="o", objective="focus", lambda_stat=500.0).stat_weight() == 500.0


@pytest.fixture(scope="module")
def batch():
    unet = models.load_unet("embedded")
    add_lora(unet, 4, None, 0)
    torch.manual_seed(0)
    c, s = unet.config.in_channels, unet.config.sample_size
    lat_w, lat_l, noise = torch.randn(2, c, s, s), torch.randn(2, c, s, s), torch.randn(2, c, s, s)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim)
    from diffusers import DDPMScheduler

    ns = DDPMScheduler.from_config(models.scheduler_config("embedded"), clip_sample=False)
    return unet, ns, emb, lat_w, lat_l, torch.tensor([100, 700]), noise


class Mean(Objective):
    """A toy objective, in no registry: the mean of the policy's errors."""

    name = "mean"
    summary = "a test objective"
    default_lambda_stat = 0.0

    def loss(self, pred: Predictions):
        policy, ref = pred.errors()
        assert policy.shape == ref.shape == (2 * pred.m,)
        return policy.mean(), {"mean": policy.mean().detach()}


def test_the_step_calls_any_objective_through_the_protocol(batch):
    unet, ns, emb, lat_w, lat_l, t, noise = batch
    cfg = TrainConfig(pool="p", output="o", objective="dpo")
    autocast = torch.autocast("cpu", enabled=False)
    loss, stats = train_step.micro_step(cfg, unet, unet, ns, emb, lat_w, lat_l, t, noise, autocast, objective=Mean(cfg))
    assert set(stats) == {"mean", "loss"} and float(stats["loss"]) == float(stats["mean"])
    # With statistic matching on, the step adds it to whatever the objective returns.
    on = TrainConfig(pool="p", output="o", objective="dpo", lambda_stat=1e4)
    regularised, stats = train_step.micro_step(on, unet, unet, ns, emb, lat_w, lat_l, t, noise, autocast,
                                               objective=Mean(on))
    assert float(regularised) == pytest.approx(float(loss) + 1e4 * float(stats["stat"]), rel=1e-6)
    # ... and dpo with statistic matching is hgdpo at the same weight.
    hg, _ = train_step.micro_step(TrainConfig(pool="p", output="o", lambda_stat=1e4), unet, unet, ns, emb, lat_w,
                                  lat_l, t, noise, autocast)
    dpo, _ = train_step.micro_step(on, unet, unet, ns, emb, lat_w, lat_l, t, noise, autocast)
    assert torch.equal(hg, dpo)


def test_the_step_does_not_branch_on_objective_names():
    source = (REPO / "hgdpo" / "train" / "step.py").read_text() + (REPO / "hgdpo" / "train" / "trainer.py").read_text()
    for name in OBJECTIVES:
        assert not re.search(rf"""objective\s*[!=]=\s*["']{name}["']""", source), name
