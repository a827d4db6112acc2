"""Cross-attention capture on a diffusers ``UNet2DConditionModel``: where each prompt token looks.

OSPO builds its object masks (``hgdpo.objectives.masks``) from the attention of the image positions to a
prompt's noun tokens. ``capture`` records it during ordinary UNet calls:

    with capture(unet, tokens=[2, 5], resolutions=[16]) as cap:
        eps_pred = unet(latents, t, encoder_hidden_states=text).sample
    maps = cap.mean(size=latents.shape[-2:])          # (B, 2, H, W), a detached float32 tensor

**Which layers.** Only cross-attention layers (``attn2``, image queries, text keys). They are
chosen by *resolution*: the side, in latent pixels, of the layer's feature map at the UNet's
native latent size ``unet.config.sample_size`` (``cross_attention_layers`` lists them). SD1.5
(native latent 64) has 64, 32, 16 and 8 (the mid block alone); the embedded UNet (native 16) has
8 only (``down_blocks.1``, the mid block and ``up_blocks.0``). A resolution names the same layers
whatever the input's size: at a 704x1024 image (88x128 latent) SD1.5's resolution 16 is the
layers whose maps are 22x32. ``None`` selects every cross-attention layer.

**What is recorded.** For each selected layer, the attention probabilities
``softmax(Q K^T * scale)`` over the text tokens, averaged over heads, for the chosen token
indices only: ``cap.maps[layer]`` is ``(B, T, h, w)`` (``T = len(tokens)``, in the order given;
all tokens for ``tokens=None``, where the maps sum to 1 over T at every position). ``B`` is the
UNet's batch as called: under classifier-free guidance done in one call (diffusers' pipelines
concatenate ``[uncond, cond]``), the first half of the batch is the unconditional prompt's.
Each UNet call inside the capture replaces the previous call's maps. Maps are recorded without
gradient (the masks are constants of the loss) and in float32; only ``(B, T, h, w)`` per layer is
kept, never the full ``(B * heads, h * w, 77)`` probabilities beyond the layer call.

**Cost and exactness.** Outside ``capture`` nothing is installed: the UNet keeps its own
processors and no hook. Inside, the selected layers compute attention explicitly, exactly as
diffusers' ``AttnProcessor`` does (``Attention.get_attention_scores`` then ``bmm`` with the
values), and the output is computed from the very probabilities that are recorded. So:

- a UNet on ``AttnProcessor`` ("eager") gives bit-identical outputs with capture on and off;
- a UNet on ``AttnProcessor2_0`` (PyTorch's fused ``scaled_dot_product_attention``, diffusers'
  default) gives the same outputs to float rounding: the fused kernel sums in another order.
  In float32 the UNet's prediction differs by at most ~1e-6 (tested at ``atol=rtol=1e-5``).

Explicit attention keeps the ``(B * heads, h * w, 77)`` probabilities for the backward pass in
training, as the eager processor does; the cross-attention maps are small next to self-attention's.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["cross_attention_layers", "capture", "Capture", "RecordingAttnProcessor"]

CLIP_MAX_LENGTH = 77  # SD1.5's text length (hgdpo.models.tokenizer.CLIP_MAX_LENGTH)

# down_blocks.<i> / mid_block / up_blocks.<j> . attentions.<k> . transformer_blocks.<t> . attn2
_LAYER = re.compile(r"^(?:down_blocks\.(?P<down>\d+)|mid_block|up_blocks\.(?P<up>\d+))"
                    r"\.attentions\.\d+\.transformer_blocks\.\d+\.attn2$")


def cross_attention_layers(unet) -> dict[str, int]:
    """Every cross-attention layer of ``unet`` (module name) and its resolution.

    The resolution is the side of the layer's feature map, in latent pixels, at the native latent
    size ``unet.config.sample_size``: down block ``i`` works at ``1 / 2**i`` of it, the mid block
    at the coarsest level ``n - 1`` (``n`` blocks), up block ``j`` at level ``n - 1 - j``.
    """
    from diffusers.models.attention_processor import Attention

    n = len(unet.config.block_out_channels)
    sample_size = unet.config.sample_size
    side = sample_size if isinstance(sample_size, int) else sample_size[0]
    layers = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2" and module.is_cross_attention):
            continue
        match = _LAYER.match(name)
        if match is None:
            raise ValueError(f"cross-attention layer {name} is not in a UNet2DConditionModel block layout")
        if match["down"] is not None:
            level = int(match["down"])
        elif match["up"] is not None:
            level = n - 1 - int(match["up"])
        else:
            level = n - 1
        layers[name] = math.ceil(side / 2**level)  # Downsample2D (stride 2, padding 1) rounds up
    return layers


def config_resolutions(config: dict) -> list[int]:
    """The resolutions of a UNet's cross-attention layers from its config alone (no weights), as
    ``cross_attention_layers`` measures them; for checking settings before a model is loaded."""
    n = len(config["block_out_channels"])
    sample_size = config["sample_size"]
    side = sample_size if isinstance(sample_size, int) else sample_size[0]
    levels = [i for i, kind in enumerate(config["down_block_types"]) if "CrossAttn" in kind]
    levels += [n - 1 - j for j, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind]
    if "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        levels.append(n - 1)
    return sorted({math.ceil(side / 2**level) for level in levels}, reverse=True)


def default_resolution(resolutions: Sequence[int], side: int) -> int:
    """The resolution nearest a quarter of the latent side (SD1.5: 16 of 64, the layers whose maps follow
    objects best; ties: the finer)."""
    return min(resolutions, key=lambda r: (abs(r - side / 4), -r))


@dataclass
class Capture:
    """What ``capture`` yields: the chosen layers and, after a UNet call, their maps."""

    tokens: tuple[int, ...] | None
    """The recorded token indices, in the order of the maps' axis 1 (``None``: all tokens)."""
    layers: dict[str, int]
    """The selected layers and their resolutions (see ``cross_attention_layers``)."""
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per layer, ``(B, T, h, w)`` float32: head-averaged attention of each position to each token,
    from the latest UNet call. Empty until the UNet is called."""

    def mean(self, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Every layer's map resized to ``size`` (bilinear) and averaged over layers, each layer
        weighing the same.

        Args:
            size: ``(H, W)`` or a side; ``None``: the largest recorded map's size.

        Returns:
            ``(B, T, H, W)`` float32. Bilinear resizing mixes positions convexly, so maps of all
            tokens still sum to 1 over T.
        """
        if not self.maps:
            raise RuntimeError("no attention maps: the UNet was not called inside the capture")
        maps = list(self.maps.values())
        if size is None:
            size = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        resized = [m if tuple(m.shape[-2:]) == size else
                   F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return torch.stack(resized).mean(dim=0)  # (B, T, H, W)


class RecordingAttnProcessor:
    """Diffusers' eager cross-attention (``AttnProcessor``'s computation) that also records, into
    ``store[name]``, the head-averaged probabilities of the chosen tokens as ``(B, T, h, w)``.

    ``hw`` is the layer's feature-map size, set by ``capture``'s hook on the enclosing
    ``Transformer2DModel`` (a cross-attention layer sees its queries flattened to ``h * w``).
    """

    def __init__(self, name: str, tokens: tuple[int, ...] | None, store: dict[str, torch.Tensor]):
        self.name = name
        self.tokens = tokens
        self.store = store
        self.hw: tuple[int, int] | None = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        # *args/**kwargs: the deprecated ``scale`` argument, which AttnProcessor ignores too.
        if encoder_hidden_states is None:
            raise RuntimeError(f"{self.name}: a cross-attention layer was called without encoder_hidden_states")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
            hw = (height, width)
        else:
            hw = self.hw
        batch, text_length = encoder_hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, text_length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)  # (B * heads, HW, d)
        key = attn.head_to_batch_dim(key)  # (B * heads, L, d)
        value = attn.head_to_batch_dim(value)  # (B * heads, L, d)

        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, HW, L)
        self._record(probs, batch, attn.heads, hw)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, HW, heads * d)
        del probs

        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @torch.no_grad()
    def _record(self, probs: torch.Tensor, batch: int, heads: int, hw: tuple[int, int] | None) -> None:
        positions, text_length = probs.shape[1:]
        if self.tokens is not None and max(self.tokens) >= text_length:
            raise ValueError(f"tokens {[t for t in self.tokens if t >= text_length]} are out of range: "
                             f"{self.name} attends to {text_length} text tokens")
        if hw is None or hw[0] * hw[1] != positions:
            raise RuntimeError(f"{self.name}: cannot lay out {positions} positions as the feature map {hw}")
        chosen = probs if self.tokens is None else probs[:, :, list(self.tokens)]  # (B * heads, HW, T)
        n_tokens = chosen.shape[-1]
        maps = chosen.float().view(batch, heads, positions, n_tokens).mean(dim=1)  # (B, HW, T)
        self.store[self.name] = maps.transpose(1, 2).reshape(batch, n_tokens, *hw)  # (B, T, h, w)


def _check_tokens(tokens: Sequence[int] | None, text_length: int) -> tuple[int, ...] | None:
    if tokens is None:
        return None
    tokens = tuple(tokens)
    if not tokens:
        raise ValueError("tokens is empty: give the token indices to record, or None for all")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError(f"tokens must be integer token indices; got {list(tokens)}")
    bad = [t for t in tokens if not 0 <= t < text_length]
    if bad:
        raise ValueError(f"tokens {bad} are out of range: the text has {text_length} tokens "
                         f"(indices 0 to {text_length - 1})")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"tokens has repeated indices: {list(tokens)}")
    return tokens


def _select(layers: dict[str, int], resolutions: Sequence[int] | None, side: int) -> dict[str, int]:
    if not layers:
        raise ValueError("the UNet has no cross-attention layers")
    if resolutions is None:
        return dict(layers)
    resolutions = list(resolutions)
    have = sorted(set(layers.values()), reverse=True)
    missing = [r for r in resolutions if r not in have]
    if not resolutions or missing:
        raise ValueError(f"resolutions {resolutions}: this UNet's cross-attention layers have resolutions "
                         f"{', '.join(map(str, have))} (feature-map sides in latent pixels at its native "
                         f"latent size {side})")
    return {name: r for name, r in layers.items() if r in resolutions}


@contextlib.contextmanager
def capture(unet, tokens: Sequence[int] | None = None, resolutions: Sequence[int] | None = None, *,
            text_length: int = CLIP_MAX_LENGTH) -> Iterator[Capture]:
    """Record cross-attention maps during the UNet calls inside the ``with`` block.

    Installs a ``RecordingAttnProcessor`` on the selected cross-attention layers and a forward
    pre-hook on their ``Transformer2DModel`` (for the feature-map size); on exit, also on an
    exception, removes the hooks and puts back the very processor objects that were there.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (LoRA adapters are fine: they live in the
            projections, which the recorder calls). Its selected layers must use diffusers'
            ``AttnProcessor2_0`` or ``AttnProcessor``; any other processor is refused, since the
            recorder would replace what it computes.
        tokens: text token indices to record (e.g. a noun's sub-tokens; 0 is the start token),
            distinct, in ``[0, text_length)``. ``None``: all tokens.
        resolutions: which layers, by resolution (see ``cross_attention_layers``); ``None``: all.
        text_length: the text's length in tokens (CLIP's 77), against which ``tokens`` is checked.

    Yields:
        A ``Capture``, whose ``maps`` fill in at each UNet call.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    chosen_tokens = _check_tokens(tokens, text_length)
    sample_size = unet.config.sample_size
    side = sample_size if isinstance(sample_size, int) else sample_size[0]
    selected = _select(cross_attention_layers(unet), resolutions, side)
    modules = {name: unet.get_submodule(name) for name in selected}
    for name, module in modules.items():
        if type(module.processor) not in (AttnProcessor, AttnProcessor2_0):
            raise ValueError(f"{name} uses {type(module.processor).__name__}; capture supports diffusers' "
                             f"AttnProcessor2_0 and AttnProcessor (is a capture already active?)")
        if module.norm_q is not None or module.norm_k is not None:
            raise ValueError(f"{name} normalises its queries and keys, which AttnProcessor does not")

    cap = Capture(tokens=chosen_tokens, layers=selected)
    previous = {name: module.processor for name, module in modules.items()}
    recorders: dict[str, list[RecordingAttnProcessor]] = {}  # Transformer2DModel name -> its layers
    for name in modules:
        recorders.setdefault(name.split(".transformer_blocks.")[0], []).append(
            RecordingAttnProcessor(name, chosen_tokens, cap.maps))

    def note_size(layers: list[RecordingAttnProcessor]):
        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]  # (B, C, h, w)
            for recorder in layers:
                recorder.hw = tuple(hidden_states.shape[-2:])
        return hook

    handles = []
    try:
        for parent, layers in recorders.items():
            handles.append(unet.get_submodule(parent).register_forward_pre_hook(note_size(layers), with_kwargs=True))
            for recorder in layers:
                modules[recorder.name].set_processor(recorder)
        yield cap
    finally:
        for name, module in modules.items():
            module.set_processor(previous[name])
        for handle in handles:
            handle.remove()
