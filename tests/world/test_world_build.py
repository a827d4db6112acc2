"""The world builder stays alive (a few steps of each stage), and its outputs load like real models."""

import json

import numpy as np
import pytest

from hgdpo.models import loading as models
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


def test_unet_only_rebuild_keeps_the_worlds_clip_and_vae(tiny_world, tmp_path):
    """A new tailored UNet (here with text at 16x16) on a built world's CLIP and VAE, which stay bit for bit."""
    import torch

    from hgdpo.errors import HgdpoError

    src, _ = tiny_world
    settings = BuildSettings(train_captions=64, unet_steps=2, unet_batch=4, renders_per_caption=1, unet_text_at_16=True)
    info = build(tmp_path / "v2", settings, log=lambda m: None, unet_only_from=src)
    assert info["clip_and_vae_from"] == str(src) and "clip_s" not in info["build_seconds"]
    old, new = models.load_pipeline(str(src / "pipeline")), models.load_pipeline(str(tmp_path / "v2" / "pipeline"))
    for part in ("vae", "text_encoder"):
        for name, value in getattr(old, part).state_dict().items():
            assert torch.equal(getattr(new, part).state_dict()[name], value), (part, name)
    assert old.unet.config.down_block_types[0] == "DownBlock2D"
    assert list(new.unet.config.down_block_types) == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert (tmp_path / "v2" / "scorer" / "config.json").is_file()
    with pytest.raises(HgdpoError, match="--unet-only-from: .* is not a built world"):
        build(tmp_path / "v3", settings, log=lambda m: None, unet_only_from=tmp_path)


def test_continued_unet_starts_from_the_worlds_own(tiny_world, tmp_path):
    """--continue-unet trains the world's UNet further: one step at a tiny rate leaves it close to where it was,
    a new UNet is far from it; an architecture other than the one continued is refused."""
    from hgdpo.errors import HgdpoError

    src, _ = tiny_world
    settings = BuildSettings(train_captions=64, unet_steps=1, unet_batch=4, unet_lr=1e-6, renders_per_caption=1)
    info = build(tmp_path / "more", settings, log=lambda m: None, unet_only_from=src, continue_unet=True)
    assert info["unet_continued_from"] == str(src)
    assert info["from_world"] == json.loads((src / "world.json").read_text())  # the history reads back to scratch
    from diffusers import UNet2DConditionModel

    old_unet = models.load_pipeline(str(src / "pipeline")).unet
    old = old_unet.state_dict()
    more = models.load_pipeline(str(tmp_path / "more" / "pipeline")).unet.state_dict()
    new = UNet2DConditionModel.from_config(old_unet.config).state_dict()  # a fresh UNet of the same shape
    moved = max((more[k] - old[k]).abs().max().item() for k in old)
    assert 0 < moved < 1e-4
    assert max((new[k] - old[k]).abs().max().item() for k in old) > 1e-2
    settings.unet_text_at_16 = True
    with pytest.raises(HgdpoError, match="--unet-text-at-16 differs"):
        build(tmp_path / "bad", settings, log=lambda m: None, unet_only_from=src, continue_unet=True)
    with pytest.raises(HgdpoError, match="--continue-unet needs --unet-only-from"):
        build(tmp_path / "bad2", settings, log=lambda m: None, continue_unet=True)


def test_text_sensitivity_is_zero_when_the_unet_ignores_the_text(tmp_path):
    """The embedded model's samples move with the caption; zero its cross-attention outputs and they do not."""
    import torch

    from hgdpo.models.embedded import pipeline_dir
    from hgdpo.world.measure import sample_world, text_sensitivity
    from hgdpo.world.prompts import make_prompts

    captions = make_prompts(6, "test")
    images = sample_world(str(pipeline_dir()), captions, 2, steps=4)
    moved = text_sensitivity(str(pipeline_dir()), captions, images, steps=4)
    assert moved["all"] > 0.05 and set(moved) > {"all"}, moved

    deaf = models.load_pipeline(str(pipeline_dir()))
    with torch.no_grad():
        for name, module in deaf.unet.named_modules():
            if name.endswith("attn2.to_out.0"):  # cross-attention's output: the text's only way in
                module.weight.zero_()
                module.bias.zero_()
    deaf.save_pretrained(tmp_path / "deaf", safe_serialization=True)
    images = sample_world(str(tmp_path / "deaf"), captions, 2, steps=4)
    assert text_sensitivity(str(tmp_path / "deaf"), captions, images, steps=4)["all"] < 1e-4  # float noise only
