"""Exporting an adapter for the community tools: the kohya LoRA format (A1111, ComfyUI, Forge, kohya).

The trainer writes adapters in the diffusers LoRA format (``hgdpo.models.lora``): one safetensors file whose
keys are ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``, with the rank and ``lora_alpha``
in its metadata. AUTOMATIC1111, ComfyUI, Forge, InvokeAI and kohya's own scripts read the kohya
format instead, one safetensors file with three tensors per adapted layer:

=====================================================  ==========  ================================
key                                                    shape       meaning
=====================================================  ==========  ================================
``lora_unet_<module>.lora_down.weight``                (r, in)     peft's ``lora_A``
``lora_unet_<module>.lora_up.weight``                  (out, r)    peft's ``lora_B``
``lora_unet_<module>.alpha``                           ()          the layer's scale is alpha / r
=====================================================  ==========  ================================

``<module>`` is the layer's path in the diffusers ``UNet2DConditionModel`` with every ``.`` written
``_``: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` becomes
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``. For SD 1.x this is
the layout kohya's scripts write (they train SD 1.x on a UNet with diffusers' module names; only
their SDXL files use the original ``input_blocks`` names), and the one A1111 and ComfyUI map onto
the original LDM UNet themselves; diffusers' ``load_lora_weights`` reads it back too
(``diffusers.loaders.lora_conversion_utils._convert_non_diffusers_lora_to_diffusers``). So no
original-layout (``hgdpo.models.single_file``) renaming is involved.

``alpha`` is the adapter's real ``lora_alpha``: diffusers' own ``convert_state_dict_to_kohya``
writes ``alpha = rank``, which silently sets every layer's scale to 1 and changes the images of an
adapter trained with ``lora_alpha != rank``. Alpha is stored as float32 whatever the weights'
dtype, so a value such as 3.7 survives a float16 export.

The file's metadata carries kohya's ``ss_*`` fields the tools display (``ss_network_module``,
``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version = sd_v1``) and ``hgdpo_adapter``,
the adapter's ``hgdpo_adapter.json`` (its training config, base model and versions).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from hgdpo.config.core import doc
from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.infra import storage
from hgdpo.models.lan import adapter_info
from hgdpo.models.lora import ADAPTER_FILE, INFO_FILE

PREFIX = "lora_unet_"
FORMATS = ("diffusers", "kohya")
DTYPES = ("float32", "float16", "bfloat16")
# A key of the diffusers LoRA format (hgdpo.models.lora.save_adapter), or of peft's own naming.
_DIFFUSERS_KEY = re.compile(r"^unet\.(?P<module>.+)\.(?P<part>lora\.down|lora\.up|lora_A|lora_B)\.weight$")
_PART = {"lora.down": "down", "lora_A": "down", "lora.up": "up", "lora_B": "up"}


@dataclass
class ExportConfig:
    """Export an adapter of ``jobs/train.py`` as diffusers LoRA (a folder) or kohya LoRA (one file)."""

    SECTION = "export"

    adapter: str = doc("The adapter folder or URI written by jobs/train.py (<output>/adapter).")
    output: str = doc("Where to write it: for `diffusers` a folder (or URI), for `kohya` a .safetensors "
                      "file (or URI) for A1111, ComfyUI, Forge or kohya's scripts.")
    format: Literal["diffusers", "kohya"] = doc(
        "`diffusers`: the adapter folder as diffusers' load_lora_weights reads it; `kohya`: one file of "
        "lora_unet_* keys with the adapter's real lora_alpha.", "diffusers")
    dtype: Literal["float32", "float16", "bfloat16"] = doc(
        "Precision of the kohya file's weights (float16 halves it; alpha stays float32). The diffusers "
        "format is copied as trained.", "float32")
    overwrite: bool = doc("Replace an existing output. Off: an existing output is refused.", False)

    def __post_init__(self):
        if self.format == "kohya" and not self.output.endswith(".safetensors"):
            raise ConfigError(f"export.output: {self.output!r} must be a .safetensors file for format=kohya")
        if self.format == "diffusers" and self.output.endswith(".safetensors"):
            raise ConfigError(f"export.output: {self.output!r} is a file name; format=diffusers writes a folder "
                              f"(or set format=kohya)")
        if self.format == "diffusers" and self.dtype != "float32":
            raise ConfigError("export.dtype: only format=kohya converts the weights; leave dtype at float32")


def kohya_name(module: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_..._to_q``."""
    return PREFIX + module.replace(".", "_")


@dataclass
class Adapter:
    """A trained adapter as read from its folder: per UNet module its (down, up) weights, rank, alpha."""

    layers: dict  # module path -> (down (r, in), up (out, r)) tensors
    rank: int
    alpha: float
    info: dict  # hgdpo_adapter.json

    def scale(self) -> float:
        return self.alpha / self.rank


def read_adapter(location: str) -> Adapter:
    """Read an adapter folder (local or a storage URI) of ``hgdpo.models.lora.save_adapter``; refuse what is not one,
    naming the file and the key."""
    from safetensors import safe_open

    location, info = adapter_info(location)
    with storage.errors("adapter", location):
        with storage.local_copy(location) as local:
            path = local / ADAPTER_FILE
            try:
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as err:  # safetensors raises several types for a damaged file
                raise HgdpoError(f"adapter: {storage.join(location, ADAPTER_FILE)} is not a readable safetensors "
                                 f"file: {err}") from None
    where = storage.join(location, ADAPTER_FILE)
    rank, alpha = _rank_alpha(metadata, where)
    layers: dict[str, dict] = {}
    for key, tensor in tensors.items():
        found = _DIFFUSERS_KEY.match(key)
        if not found:
            raise HgdpoError(f"adapter: {where} has key {key!r}, not a UNet LoRA weight (unet.<module>.lora.down/"
                             f"up.weight); only UNet adapters of jobs/train.py are exported")
        layers.setdefault(found["module"], {})[_PART[found["part"]]] = tensor
    if not layers:
        raise HgdpoError(f"adapter: {where} holds no LoRA weights")
    pairs = {}
    for module, parts in sorted(layers.items()):
        if set(parts) != {"down", "up"}:
            raise HgdpoError(f"adapter: {where}: module {module!r} has only its lora {' '.join(parts)} weight")
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != rank or up.shape[1] != rank:
            raise HgdpoError(f"adapter: {where}: module {module!r} has down {tuple(down.shape)} and up "
                             f"{tuple(up.shape)}, not of rank {rank} (linear LoRA layers expected)")
        pairs[module] = (down, up)
    return Adapter(pairs, rank, alpha, info if isinstance(info, dict) else {})


def _rank_alpha(metadata: dict, where: str) -> tuple[int, float]:
    """The rank and lora_alpha diffusers' ``save_lora_weights`` records in the file's metadata."""
    try:
        meta = json.loads(metadata["lora_adapter_metadata"])
        rank, alpha = meta["unet.r"], meta["unet.lora_alpha"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise HgdpoError(f"adapter: {where} does not record its rank and lora_alpha (lora_adapter_metadata with "
                         f"unet.r and unet.lora_alpha); it was not written by jobs/train.py") from None
    if meta.get("unet.rank_pattern") or meta.get("unet.alpha_pattern"):
        raise HgdpoError(f"adapter: {where} has per-layer rank or alpha patterns, which this export does not handle")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise HgdpoError(f"adapter: {where} records rank {rank!r} and lora_alpha {alpha!r}; expected a positive "
                         f"integer and a positive number")
    return rank, float(alpha)


def to_kohya(adapter: Adapter, dtype: str = "float32") -> dict:
    """The kohya state dict of ``adapter`` (see the module docstring): weights in ``dtype``, alpha float32."""
    import torch

    weights_dtype = getattr(torch, dtype)
    state = {}
    for module, (down, up) in adapter.layers.items():
        name = kohya_name(module)
        state[f"{name}.lora_down.weight"] = down.to(weights_dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.to(weights_dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return state


def kohya_metadata(adapter: Adapter) -> dict[str, str]:
    """The safetensors metadata of a kohya file: kohya's ``ss_*`` fields and the adapter's own record."""
    alpha = adapter.alpha
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": str(int(alpha) if alpha.is_integer() else alpha),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "hgdpo_adapter": json.dumps(adapter.info, sort_keys=True, default=str),
    }


def export(cfg: ExportConfig) -> list[str]:
    """Write ``cfg.adapter`` to ``cfg.output`` in ``cfg.format``; return the files written. Every check runs
    first; each file is written atomically, and a diffusers folder's ``hgdpo_adapter.json`` comes last (a
    folder without it is not complete)."""
    from safetensors.torch import save

    storage.check_reachable(cfg.adapter, "export.adapter")
    storage.check_uri(cfg.output, "export.output")
    with storage.errors("export.output", cfg.output):
        if storage.exists(cfg.output) and not cfg.overwrite:
            raise HgdpoError(f"export.output: {cfg.output} exists; choose another output or set overwrite=true")
    # a kohya file goes into a folder: that folder must be writable
    storage.check_writable(cfg.output if cfg.format == "diffusers" else storage.parent(cfg.output), "export.output")
    adapter = read_adapter(cfg.adapter)
    with storage.errors("export.output", cfg.output):
        if cfg.format == "diffusers":
            if storage.is_file(storage.join(cfg.output, INFO_FILE)):  # overwrite: incomplete until it is rewritten
                storage.delete(storage.join(cfg.output, INFO_FILE))
            return [storage.join(cfg.output, name)
                    for name in storage.copy_tree(cfg.adapter, cfg.output, last=INFO_FILE)]
        storage.write_bytes(cfg.output, save(to_kohya(adapter, cfg.dtype), metadata=kohya_metadata(adapter)))
    return [cfg.output]
