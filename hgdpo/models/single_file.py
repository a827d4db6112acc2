"""Export a diffusers ``StableDiffusionPipeline`` as one original-layout ``.safetensors`` checkpoint.

What it is for: after HG-DPO training, users merge the learned weights into their model and want
to share it or use it in other tools (AUTOMATIC1111, ComfyUI, civitai, ...), which expect the
single-file layout of the original Stable Diffusion code (LDM / CompVis):

* ``model.diffusion_model.*``                  the UNet,
* ``first_stage_model.*``                      the VAE,
* ``cond_stage_model.transformer.text_model.*`` the CLIP text encoder.

The tests also use it to make a single-file checkpoint of the tiny embedded model, so the
single-file loading path (``hgdpo.models.loading.load_pipeline``) is exercised without any download.

The key mapping is the inverse of the one diffusers applies when it loads such a file
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), so loading the exported file
with ``StableDiffusionPipeline.from_single_file`` gives back the same weights, bit for bit. The
block layout is derived from the component configs, so any number of blocks and any
``layers_per_block`` work, not only SD1.5's. Tokenizer and scheduler are not part of the file (as
in the original format); loaders take them from a config folder (``model_config``).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# UNet keys outside the down/mid/up blocks (diffusers name -> LDM name).
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Submodules of a UNet ResnetBlock2D (diffusers -> LDM ResBlock).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# VAE keys outside the blocks.
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
# VAE mid-block attention (diffusers Attention -> LDM AttnBlock). The projections are linear
# layers in diffusers and 1x1 convolutions in LDM.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN_CONV = {"q", "k", "v", "proj_out"}


def _split(rest: str, names) -> tuple[str, str] | None:
    """``"to_out.0.weight"`` with names containing ``"to_out.0"`` -> ``("to_out.0", "weight")``."""
    for name in names:
        if rest.startswith(name + "."):
            return name, rest[len(name) + 1:]
    return None


def _layers_per_block(config, what: str) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"{what}: layers_per_block={lpb!r} differs per block; the single-file "
                         f"format needs one value for all blocks")
    return lpb


def unet_key(key: str, config) -> str:
    """The LDM name (without ``model.diffusion_model.``) of a diffusers UNet2DConditionModel key."""
    lpb = _layers_per_block(config, "unet")
    per_block = lpb + 1  # LDM input/output slots per diffusers block
    top = _split(key, _UNET_TOP)
    if top:
        return f"{_UNET_TOP[top[0]]}.{top[1]}"

    def resnet(prefix: str, rest: str) -> str:
        part = _split(rest, _UNET_RESNET)
        if part is None:
            raise ValueError(f"unet: unexpected resnet parameter {key!r}")
        return f"{prefix}.{_UNET_RESNET[part[0]]}.{part[1]}"

    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 1 + block * per_block + layer
        if kind == "resnets":
            return resnet(f"input_blocks.{slot}.0", rest)
        return f"input_blocks.{slot}.1.{rest}"  # SpatialTransformer names match diffusers'
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{1 + int(m[1]) * per_block + lpb}.0.op.{m[2]}"

    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, index, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":  # resnet, attention, resnet
            return resnet(f"middle_block.{2 * index}", rest)
        return f"middle_block.{2 * index + 1}.{rest}"

    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = block * per_block + layer
        if kind == "resnets":
            return resnet(f"output_blocks.{slot}.0", rest)
        return f"output_blocks.{slot}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        block = int(m[1])
        # The upsampler follows the block's last resnet (and its attention, if the block has one).
        has_attention = "CrossAttn" in config["up_block_types"][block]
        return f"output_blocks.{block * per_block + lpb}.{2 if has_attention else 1}.conv.{m[2]}"
    raise ValueError(f"unet: parameter {key!r} has no place in the Stable Diffusion single-file layout")


def vae_key(key: str, config) -> str:
    """The LDM name (without ``first_stage_model.``) of a diffusers AutoencoderKL key."""
    n_up = len(config["up_block_types"])
    top = _split(key, _VAE_TOP)
    if top:
        return f"{_VAE_TOP[top[0]]}.{top[1]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # LDM counts decoder levels from the lowest resolution up: its up.0 is diffusers' last up block.
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        level = n_up - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key)
    if m:
        part = _split(m[2], _VAE_ATTN)
        if part:
            return f"{m[1]}.mid.attn_1.{_VAE_ATTN[part[0]]}.{part[1]}"
    raise ValueError(f"vae: parameter {key!r} has no place in the Stable Diffusion single-file layout")


def text_encoder_key(key: str) -> str:
    """The LDM name (without ``cond_stage_model.transformer.``) of a CLIPTextModel key."""
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); the file keeps it.
    return key if key.startswith("text_model.") else f"text_model.{key}"


def ldm_state_dict(pipe, *, dtype=None) -> dict:
    """The pipeline's UNet, VAE and text-encoder weights under their single-file (LDM) names.

    Tensors are detached, on CPU and contiguous; floating-point ones are cast to ``dtype`` if
    given. Raises ``ValueError`` for a parameter the format has no place for (rather than
    silently dropping it).
    """
    out: dict = {}

    def put(name: str, tensor) -> None:
        if name in out:
            raise ValueError(f"two parameters map to the same single-file key {name!r}")
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous()

    for key, tensor in pipe.unet.state_dict().items():
        put(UNET_PREFIX + unet_key(key, pipe.unet.config), tensor)
    for key, tensor in pipe.vae.state_dict().items():
        name = vae_key(key, pipe.vae.config)
        if name.rsplit(".", 2)[-2] in _VAE_ATTN_CONV and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # linear -> 1x1 conv
        put(VAE_PREFIX + name, tensor)
    for key, tensor in pipe.text_encoder.state_dict().items():
        put(TEXT_PREFIX + text_encoder_key(key), tensor)
    return out


def export_single_file(pipe, path, *, dtype=None) -> Path:
    """Write ``pipe``'s UNet, VAE and CLIP text encoder to one ``.safetensors`` file at ``path``.

    The file uses the original Stable Diffusion key layout (see the module docstring) and loads
    with ``StableDiffusionPipeline.from_single_file`` and the usual community tools. ``dtype``
    (e.g. ``torch.float16``) casts the floating-point weights; by default they are written as they
    are. The file is written next to its destination and renamed into place, so an interrupted
    export never leaves a partial checkpoint. Returns the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single-file checkpoint must end in .safetensors")
    tensors = ldm_state_dict(pipe, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
