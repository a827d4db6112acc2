"""The world builder stays alive (a few steps of each stage), and its outputs load like real models."""

import json

import numpy as np
import pytest

from hgdpo import models
from hgdpo.world.build import BuildSettings, build
from hgdpo.world.measure import agreement


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    settings = BuildSettings(train_captions=64, clip_steps=3, clip_batch=8, vae_steps=3, vae_batch=4,
                             unet_steps=3, unet_batch=8, renders_per_caption=1)
    info = build(out, settings, log=lambda m: None)
    return out, info


def test_builder_writes_loadable_real_formats(tiny_world):
    import torch

    out, info = tiny_world
    assert json.loads((out / "world.json").read_text())["settings"]["unet_steps"] == 3
    assert info["build_seconds"]["total_s"] > 0
    pipe = models.load_pipeline(str(out / "pipeline"))
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' spread
    assert pipe.unet.dtype == torch.float32  # stored in float16, upcast on load
    processor, clip = models.load_scorer(str(out / "scorer"))
    # The SD text encoder is the scorer's text tower.
    te = pipe.text_encoder.state_dict()
    for name, value in clip.text_model.state_dict().items():
        assert torch.equal(te[name], value), name
    assert models.fingerprint(models.resolve_model(str(out / "pipeline")))


def test_agreement_counts_pairs_and_skips_ties():
    ai = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    judge = np.array([[0.9, 0.5, 0.52], [0.1, 0.2, 0.9]])
    # prompt 0: pairs (0,1) agree, (0,2) agree, (1,2) tie (|0.5-0.52| <= 0.05) -> skipped
    # prompt 1: (0,1) agree (1>0, 0.2>0.1), (0,2) agree, (1,2) agree -> 5 of 5
    assert agreement(ai, judge) == (1.0, 5)
    judge[1] = [0.9, 0.5, 0.1]  # now the AI orders prompt 1 exactly backwards: 3 disagreements
    assert agreement(ai, judge) == (2 / 5, 5)
    # a wider tie band drops pairs: only |0.9-0.1| and |0.5-0.1| remain in prompt 1, (0,1) in prompt 0...
    assert agreement(ai, judge, tie=0.39)[1] == 4
