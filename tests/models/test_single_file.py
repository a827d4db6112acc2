"""Single-file (original Stable Diffusion layout) checkpoints: export, load back, refuse bad files.

The embedded tiny pipeline is exported with ``hgdpo.models.single_file.export_single_file`` and loaded
back through ``hgdpo.models.loading.load_pipeline`` (diffusers' own single-file loader, configs from the
embedded folder), with the network blocked: weights and images must come back identical.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hgdpo.errors import HgdpoError
from hgdpo.models import embedded
from hgdpo.models import loading as models
from hgdpo.models.single_file import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, export_single_file, ldm_state_dict

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(original pipeline, exported file, embedded config folder), built once for the module."""
    folder = embedded.pipeline_dir()
    pipe = models.load_pipeline(str(folder))
    file = export_single_file(pipe, tmp_path_factory.mktemp("export") / "tiny.safetensors")
    return pipe, file, folder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _generate(pipe) -> np.ndarray:
    return pipe(["a photo of a cat"], num_images_per_prompt=2, num_inference_steps=4, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(7), output_type="np").images


def test_export_layout(exported):
    from safetensors import safe_open

    pipe, file, _ = exported
    width = pipe.vae.config.block_out_channels[-1]
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
        # the original layout stores the VAE's mid attention as 1x1 convolutions
        assert f.get_tensor(VAE_PREFIX + "encoder.mid.attn_1.q.weight").shape == (width, width, 1, 1)
        assert f.get_tensor(VAE_PREFIX + "decoder.mid.attn_1.proj_out.weight").shape == (width, width, 1, 1)
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX + "text_model.")) for k in keys)
    # the world's UNet: a plain down block, then a cross-attention one (layers_per_block=1)
    for key in ("input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight", "input_blocks.2.0.op.weight",
                "input_blocks.3.0.skip_connection.weight", "input_blocks.3.1.proj_in.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.emb_layers.1.weight",
                "output_blocks.1.1.proj_out.weight", "output_blocks.1.2.conv.weight", "time_embed.2.bias",
                "out.2.weight"):
        assert UNET_PREFIX + key in keys, key
    assert models.resolve_model(str(file)).kind == "file"


def test_round_trip_weights_and_images(exported, no_network):
    pipe, file, folder = exported
    loaded = models.load_pipeline(str(file), model_config=str(folder))
    for name in COMPONENTS:
        original, back = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == back.keys(), name
        for key, tensor in original.items():
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), f"{name}.{key}"
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.tokenizer("a photo of a cat").input_ids == pipe.tokenizer("a photo of a cat").input_ids
    images = _generate(pipe)
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    np.testing.assert_array_equal(_generate(loaded), images)


def test_the_trainers_components_load_alone_from_a_single_file(exported, no_network):
    """What training loads: the UNet (workers), the tokenizer and text encoder (pair selection), the scheduler
    config (the prediction_type check), each without the rest of the pipeline."""
    pipe, file, folder = exported
    unet = models.load_unet(str(file), model_config=str(folder))
    tokenizer, encoder = models.load_text_encoder(str(file), model_config=str(folder))
    for name, module in (("unet", unet), ("text_encoder", encoder)):
        original, back = getattr(pipe, name).state_dict(), module.state_dict()
        assert original.keys() == back.keys(), name
        assert all(torch.equal(back[k], v) for k, v in original.items()), name
    assert tokenizer("a photo of a cat").input_ids == pipe.tokenizer("a photo of a cat").input_ids
    assert models.scheduler_config(str(file), model_config=str(folder))["prediction_type"] == "epsilon"


def test_mapping_inverts_diffusers_for_sd15_layout():
    """An SD1.5-shaped (4 blocks, 2 layers each) but tiny UNet/VAE: diffusers' converters undo the export."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 8, 16, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=8, attention_head_dim=2)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                                        num_attention_heads=2, max_position_embeddings=77))
    ckpt = ldm_state_dict(SimpleNamespace(unet=unet, vae=vae, text_encoder=text))
    assert all(t.is_contiguous() for t in ckpt.values())
    # Names real SD1.5 checkpoints use (diffusers detects v1 by the first one).
    for key in ("output_blocks.11.0.skip_connection.weight", "input_blocks.3.0.op.weight",
                "input_blocks.11.0.in_layers.2.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "middle_block.1.proj_in.weight"):
        assert UNET_PREFIX + key in ckpt, key
    for key in ("encoder.down.2.downsample.conv.weight", "decoder.up.3.upsample.conv.weight",
                "decoder.up.0.block.2.conv2.weight", "encoder.mid.block_2.norm1.weight"):
        assert VAE_PREFIX + key in ckpt, key
    assert VAE_PREFIX + "decoder.up.0.upsample.conv.weight" not in ckpt
    assert infer_diffusers_model_type(ckpt) == "v1"

    back = {
        "unet": convert_ldm_unet_checkpoint(ckpt, dict(unet.config)),
        "vae": convert_ldm_vae_checkpoint(ckpt, dict(vae.config)),
        "text_encoder": convert_ldm_clip_checkpoint(ckpt),
    }
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # flattened CLIPTextModel
        back["text_encoder"] = {k.removeprefix("text_model."): v for k, v in back["text_encoder"].items()}
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        original = model.state_dict()
        assert back[name].keys() == original.keys(), name
        for key, tensor in original.items():
            assert torch.equal(back[name][key], tensor), f"{name}.{key}"
    assert len(ckpt) == sum(len(m.state_dict()) for m in (unet, vae, text))


def test_export_refuses_other_suffix(exported, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        export_single_file(exported[0], tmp_path / "model.ckpt")


def test_resolve_refuses_pickle_checkpoint(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(HgdpoError, match="pickle"):
        models.resolve_model(str(ckpt))
    assert models.resolve_model(str(ckpt), allow_pickle=True).kind == "file"


def test_resolve_refuses_non_sd_safetensors(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(HgdpoError) as err:
        models.resolve_model(str(other))
    assert str(other) in str(err.value) and "Stable Diffusion" in str(err.value)
