"""Cross-attention capture (hgdpo.models.attention) on tiny real UNets, and OSPO's masks (hgdpo.objectives.masks)
against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from hgdpo.models import loading as models
from hgdpo.models.attention import capture, cross_attention_layers
from hgdpo.models.lora import add_lora
from hgdpo.objectives.masks import (
    gaussian_blur,
    mask_weight,
    minmax_normalise,
    noun_maps,
    object_mask,
    object_weight,
    otsu_threshold,
    resize_to_latent,
)

TEXT_DIM = 32  # the embedded text encoder's width
TEXT_LENGTH = 77


def two_level_unet() -> UNet2DConditionModel:
    """SD1.5's UNet scaled down, with cross-attention at two levels: 8 (native latent 8x8) and 4."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8).eval()


LEVEL_8 = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
           "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
           "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
LEVEL_4 = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2",
           "mid_block.attentions.0.transformer_blocks.0.attn2",
           "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
           "up_blocks.0.attentions.1.transformer_blocks.0.attn2"]


@pytest.fixture(scope="module")
def tiny_unet():
    return two_level_unet()


@pytest.fixture(scope="module")
def embedded_unet():
    return models.load_unet("embedded").eval()


def inputs(batch: int = 2, height: int = 8, width: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, height, width, generator=g)
    text = torch.randn(batch, TEXT_LENGTH, TEXT_DIM, generator=g)
    t = torch.linspace(10, 900, batch).long()
    return latents, t, text


def predict(unet, latents, t, text) -> torch.Tensor:
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=text).sample


# ---------------------------------------------------------------------------- layers

def test_cross_attention_layers_by_resolution(tiny_unet, embedded_unet):
    layers = cross_attention_layers(tiny_unet)
    assert sorted(n for n, r in layers.items() if r == 8) == sorted(LEVEL_8)
    assert sorted(n for n, r in layers.items() if r == 4) == sorted(LEVEL_4)
    # The embedded UNet (native latent 16) has cross-attention at its 8x8 level only.
    assert set(cross_attention_layers(embedded_unet).values()) == {8}
    assert len(cross_attention_layers(embedded_unet)) == 4


# ---------------------------------------------------------------------------- predictions unchanged

def test_capture_is_bit_identical_with_eager_attention():
    unet = two_level_unet()
    unet.set_attn_processor(AttnProcessor())
    x = inputs(height=8, width=12)
    off = predict(unet, *x)
    with capture(unet, tokens=[1, 4]):
        on = predict(unet, *x)
    assert torch.equal(on, off)


def test_capture_matches_default_sdpa_attention(embedded_unet):
    # The default AttnProcessor2_0 (fused SDPA) sums in another order than the explicit softmax:
    # equal to float32 rounding (observed max |diff| ~1e-6 on outputs of size ~5).
    assert {type(p) for p in embedded_unet.attn_processors.values()} == {AttnProcessor2_0}
    x = inputs(height=16, width=16)
    off = predict(embedded_unet, *x)
    with capture(embedded_unet, tokens=[1, 2, 5]):
        on = predict(embedded_unet, *x)
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


def test_capture_with_lora_matches_and_trains():
    unet = two_level_unet()
    params = add_lora(unet, rank=2, alpha=None, seed=0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero: perturb it so the adapter changes the model
                p.normal_(0, 0.1)
    x = inputs()
    off = predict(unet, *x)
    with capture(unet, tokens=[3]) as cap:
        on = unet(x[0], x[1], encoder_hidden_states=x[2]).sample
        on.square().mean().backward()
    torch.testing.assert_close(on.detach(), off, atol=1e-5, rtol=1e-5)
    assert all(p.grad is not None for p in params)  # gradients flow through the recorded attention
    assert not any(m.requires_grad for m in cap.maps.values())  # the maps are constants


# ---------------------------------------------------------------------------- restoring

def test_processors_restored_exactly_and_no_hooks_left(tiny_unet):
    before = dict(tiny_unet.attn_processors)
    hooks_before = sum(len(m._forward_pre_hooks) for m in tiny_unet.modules())
    with capture(tiny_unet, tokens=[1], resolutions=[4]):
        during = tiny_unet.attn_processors
        assert {type(during[n + ".processor"]).__name__ for n in LEVEL_4} == {"RecordingAttnProcessor"}
        assert all(during[n + ".processor"] is before[n + ".processor"] for n in LEVEL_8)
        predict(tiny_unet, *inputs())
    after = tiny_unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert {k: type(v) for k, v in after.items()} == {k: type(v) for k, v in before.items()}
    assert sum(len(m._forward_pre_hooks) for m in tiny_unet.modules()) == hooks_before == 0


def test_processors_restored_after_an_exception(tiny_unet):
    before = dict(tiny_unet.attn_processors)
    with pytest.raises(KeyError):
        with capture(tiny_unet, tokens=[1]):
            raise KeyError("inside")
    assert all(tiny_unet.attn_processors[k] is before[k] for k in before)
    assert sum(len(m._forward_pre_hooks) for m in tiny_unet.modules()) == 0


# ---------------------------------------------------------------------------- the maps

def test_maps_shapes_and_chosen_resolutions_only(tiny_unet):
    # A non-square 8x12 latent: resolution 8 names the full-size level (8x12 maps), 4 the next (4x6).
    x = inputs(batch=3, height=8, width=12)
    with capture(tiny_unet, tokens=[2, 7], resolutions=[8]) as cap:
        predict(tiny_unet, *x)
    assert sorted(cap.maps) == sorted(LEVEL_8) == sorted(cap.layers)
    assert {tuple(m.shape) for m in cap.maps.values()} == {(3, 2, 8, 12)}
    assert {m.dtype for m in cap.maps.values()} == {torch.float32}
    with capture(tiny_unet, tokens=[2, 7], resolutions=[4]) as cap:
        predict(tiny_unet, *x)
    assert sorted(cap.maps) == sorted(LEVEL_4)
    assert {tuple(m.shape) for m in cap.maps.values()} == {(3, 2, 4, 6)}
    with capture(tiny_unet, tokens=[2, 7]) as cap:
        predict(tiny_unet, *x)
    assert sorted(cap.maps) == sorted(LEVEL_8 + LEVEL_4)


def test_map_is_the_head_averaged_softmax_laid_out_row_major(tiny_unet):
    # Recompute one layer's attention by hand from its query input, with a non-square map.
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = tiny_unet.get_submodule(name)
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args: seen.setdefault("q_in", args[0]))
    x = inputs(batch=2, height=8, width=12)
    try:
        with capture(tiny_unet, tokens=[5, 0], resolutions=[4]) as cap:
            predict(tiny_unet, *x)
    finally:
        handle.remove()
    b, heads = 2, attn.heads
    q = attn.to_q(seen["q_in"]).view(b, 24, heads, -1).transpose(1, 2)  # (B, heads, 4*6, d)
    k = attn.to_k(x[2]).view(b, TEXT_LENGTH, heads, -1).transpose(1, 2)  # (B, heads, 77, d)
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (B, heads, 24, 77)
    expected = probs.mean(dim=1)[..., [5, 0]].transpose(1, 2).reshape(b, 2, 4, 6)  # (B, 2, h, w)
    torch.testing.assert_close(cap.maps[name], expected.detach(), atol=1e-6, rtol=1e-5)


def test_all_token_maps_sum_to_one_and_chosen_tokens_are_their_slice(tiny_unet):
    x = inputs(height=8, width=12)
    with capture(tiny_unet) as everything:
        predict(tiny_unet, *x)
    with capture(tiny_unet, tokens=[9, 3]) as chosen:
        predict(tiny_unet, *x)
    for name, maps in everything.maps.items():
        assert maps.shape[1] == TEXT_LENGTH
        torch.testing.assert_close(maps.sum(dim=1), torch.ones_like(maps[:, 0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(chosen.maps[name], maps[:, [9, 3]], atol=1e-7, rtol=0)
    mean = everything.mean()  # bilinear resizing keeps the per-position distribution
    torch.testing.assert_close(mean.sum(dim=1), torch.ones_like(mean[:, 0]), atol=1e-5, rtol=0)


def test_mean_resizes_every_layer_and_averages(tiny_unet):
    x = inputs(height=8, width=12)
    with capture(tiny_unet, tokens=[1, 2]) as cap:
        predict(tiny_unet, *x)
    assert cap.mean().shape == (2, 2, 8, 12)  # default: the largest map's size
    assert cap.mean(16).shape == (2, 2, 16, 16)
    resized = [torch.nn.functional.interpolate(m, size=(8, 12), mode="bilinear", align_corners=False)
               for m in cap.maps.values()]
    torch.testing.assert_close(cap.mean((8, 12)), sum(resized) / len(resized))


def test_each_call_replaces_the_maps(tiny_unet):
    with capture(tiny_unet, tokens=[1], resolutions=[4]) as cap:
        with pytest.raises(RuntimeError, match="not called"):
            cap.mean()
        predict(tiny_unet, *inputs(batch=2))
        predict(tiny_unet, *inputs(batch=1))
    assert {m.shape[0] for m in cap.maps.values()} == {1}


# ---------------------------------------------------------------------------- errors

def test_unknown_resolution_refused(tiny_unet):
    with pytest.raises(ValueError, match=r"resolutions \[16\].*8, 4"):
        with capture(tiny_unet, tokens=[1], resolutions=[16]):
            pass
    with pytest.raises(ValueError, match="resolutions"):
        with capture(tiny_unet, tokens=[1], resolutions=[]):
            pass


@pytest.mark.parametrize("tokens", [[77], [-1], [], [3, 3], [1.5]])
def test_bad_tokens_refused(tiny_unet, tokens):
    with pytest.raises(ValueError, match="tokens"):
        with capture(tiny_unet, tokens=tokens):
            pass


def test_token_beyond_the_text_refused_at_the_call(tiny_unet):
    before = dict(tiny_unet.attn_processors)
    with pytest.raises(ValueError, match=r"tokens \[80\]"):
        with capture(tiny_unet, tokens=[80], text_length=100):
            predict(tiny_unet, *inputs())  # a 77-token text
    assert all(tiny_unet.attn_processors[k] is before[k] for k in before)


def test_nested_capture_refused(tiny_unet):
    with capture(tiny_unet, tokens=[1], resolutions=[4]):
        with pytest.raises(ValueError, match="RecordingAttnProcessor"):
            with capture(tiny_unet, tokens=[2]):
                pass
    assert {type(p) for p in tiny_unet.attn_processors.values()} == {AttnProcessor2_0}


# ---------------------------------------------------------------------------- masks: Otsu

def test_otsu_two_separated_modes():
    # 6 pixels at 0.1 (bin floor(0.1 * 256) = 25) and 10 at 0.8 (bin 204). Every cut after bins
    # 25..203 separates the modes with the same between-class variance; the first is taken, so the
    # threshold is the upper edge of bin 25: 26 / 256.
    x = torch.tensor([0.1] * 6 + [0.8] * 10).view(1, 4, 4)
    threshold = otsu_threshold(x)
    assert threshold.shape == (1,)
    assert threshold.item() == 26 / 256
    assert ((x >= threshold) == (x == 0.8)).all()


def test_otsu_three_levels_by_hand():
    # 4 pixels at 0.0 (bin 0), 4 at 0.5 (bin 128), 8 at 1.0 (bin 255); bin centres (k + 0.5) / 256.
    # In units c = 1/256, centres 0.5c, 128.5c, 255.5c.
    # Cut after bin 0:   w0 = 1/4, mu0 = 0.5c, mu1 = (4*128.5 + 8*255.5)/12 c = 213.1667c
    #                    w0 w1 (mu0 - mu1)^2 = 0.1875 * 212.6667^2 c^2 = 8480.1 c^2
    # Cut after bin 128: w0 = 1/2, mu0 = (0.5 + 128.5)/2 c = 64.5c, mu1 = 255.5c
    #                    w0 w1 (mu0 - mu1)^2 = 0.25 * 191^2 c^2 = 9120.25 c^2   <- larger
    # so the threshold is 129 / 256 and only the 1.0 pixels are above it.
    x = torch.tensor([0.0] * 4 + [0.5] * 4 + [1.0] * 8).view(2, 8)
    assert otsu_threshold(x).item() == 129 / 256
    # Batched: each map its own threshold.
    both = torch.stack([x, torch.tensor([0.1] * 6 + [0.8] * 10).view(2, 8)])
    assert otsu_threshold(both).tolist() == [129 / 256, 26 / 256]


def test_otsu_single_value_and_range_check():
    assert otsu_threshold(torch.zeros(3, 3)).item() == 1 / 256  # no cut: nothing is above
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        otsu_threshold(torch.tensor([[0.5, 1.5]]))


# ---------------------------------------------------------------------------- masks: the rest

def test_minmax_normalise_and_its_constant_case():
    x = torch.stack([torch.tensor([[2.0, 4.0], [6.0, 10.0]]), torch.full((2, 2), 3.0)])[:, None]  # (2, 1, 2, 2)
    out = minmax_normalise(x)
    # Sample 0: (x - 2) / (10 - 2) = 0, 0.25, 0.5, 1. Sample 1: constant -> 0, not NaN.
    assert out[0, 0].tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert out[1, 0].tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_noun_maps_average_their_sub_tokens():
    maps = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 2, 2)  # channel i is i everywhere
    # Recorded tokens 4, 5, 9 -> channels 0, 1, 2. Noun [4, 5] -> (0 + 1) / 2; noun [9] -> 2.
    out = noun_maps(maps, [[4, 5], [9]], tokens=[4, 5, 9])
    assert out.shape == (1, 2, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="nouns"):
        noun_maps(maps, [[4, 6]], tokens=[4, 5, 9])


def test_object_mask_is_an_or_over_nouns_with_the_scaled_threshold():
    # Noun 0 is the three-level map of test_otsu_three_levels_by_hand: Otsu 129/256, scaled by 0.8
    # to 0.403, so the 0.5 and 1.0 pixels are kept (scale 1 keeps the 1.0 pixels only).
    noun_0 = torch.tensor([0.0] * 4 + [0.5] * 4 + [1.0] * 8).view(4, 4)
    noun_1 = torch.zeros(4, 4)
    noun_1[0, 0] = 1.0  # one bright pixel, at a position noun 0 leaves out
    maps = torch.stack([noun_0, noun_1])[None]  # (1, 2, 4, 4)
    mask = object_mask(maps, otsu_scale=0.8)
    assert mask.shape == (1, 1, 4, 4)
    expected = (noun_0 >= 0.5) | (noun_1 == 1.0)
    assert torch.equal(mask[0, 0], expected.float())
    assert torch.equal(object_mask(maps[:, :1], otsu_scale=1.0)[0, 0], (noun_0 == 1.0).float())
    with pytest.raises(ValueError, match="otsu_scale"):
        object_mask(maps, otsu_scale=0.0)


def test_constant_maps_give_weight_one_never_nan():
    maps = torch.full((2, 3, 8, 8), 0.25)
    weight = object_weight(maps, [[0], [1, 2]], alpha=1.0)
    assert torch.equal(weight, torch.ones(2, 1, 8, 8))
    assert torch.equal(mask_weight(torch.ones(1, 1, 8, 8), alpha=3.0), torch.ones(1, 1, 8, 8))  # object everywhere


def test_blur_preserves_a_constant_and_sums_to_one():
    x = torch.full((2, 3, 7, 9), 0.7)
    torch.testing.assert_close(gaussian_blur(x), x, atol=1e-6, rtol=0)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    blurred = gaussian_blur(impulse)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    # 5x5 kernel of sigma 1: the centre weight is 1 / (sum over -2..2 of exp(-k^2/2))^2.
    g = sum(torch.exp(torch.tensor(-(k**2) / 2.0)) for k in range(-2, 3))
    torch.testing.assert_close(blurred[0, 0, 4, 4], 1 / g**2)
    assert blurred[0, 0, 1, 4] == 0  # beyond the kernel's reach of 2


@pytest.mark.parametrize("alpha,gamma_m", [(1.0, 1.0), (2.5, 2.0), (0.0, 1.0)])
def test_weight_range(alpha, gamma_m):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 2, 16, 16, generator=g)
    weight = object_weight(maps, [[0], [1]], alpha=alpha, gamma_m=gamma_m)
    assert weight.shape == (3, 1, 16, 16)
    assert weight.min() == 1.0 and weight.max() == 1.0 + alpha  # both ends are reached
    assert not weight.isnan().any()


def test_negative_alpha_and_bad_gamma_refused():
    mask = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="alpha"):
        mask_weight(mask, alpha=-0.1)
    with pytest.raises(ValueError, match="gamma_m"):
        mask_weight(mask, gamma_m=0.0)


def test_resize_to_latent():
    weight = 1 + torch.rand(2, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    out = resize_to_latent(weight, (16, 24))
    assert out.shape == (2, 1, 16, 24)
    assert out.min() >= weight.min() and out.max() <= weight.max()
    assert resize_to_latent(weight, (8, 12)) is weight
