"""ImageReward on transformers' BLIP classes (``hgdpo.scorers.imagereward``), loaded through ``hgdpo.scorers.registry``.

A tiny model of ImageReward's architecture (BLIP ViT at 224 px with 16-px patches, a BERT text encoder
cross-attending to it, the 5-Linear reward head) is saved here in the released checkpoint's key
layout (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``, plus the unused
``vision_proj`` / ``text_proj``), with a WordPiece vocabulary and ``med_config.json`` beside it. Its
scores are checked against ``reference_scores``, a direct implementation of the package's
``ImageReward.score`` written with plain tensor operations on the original state dict.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hgdpo.errors import HgdpoError
from hgdpo.scorers import imagereward
from hgdpo.scorers.registry import ScorerSpec, check_scorer, load_scorer

V_WIDTH, V_LAYERS, V_HEADS, PATCH, SIZE = 128, 2, 2, 16, 224  # heads: BLIP's 64-wide heads (128 / 64)
T_WIDTH, T_LAYERS, T_HEADS, T_FFN, T_POSITIONS = 64, 2, 4, 96, 40  # T_HEADS from med_config.json (16-wide)
WORDS = ("a an the red green blue yellow purple large small circle square triangle on of to left right above "
         "below next and with two one three").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s"]
N_VOCAB = len(VOCAB) + 2  # BLIP adds [DEC] and [ENC]
PROMPTS = ["a large red circle on the left", "two small blue squares above a green triangle",
           "a large red circle on the left", "purple triangles and a yellow circle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def original_state() -> dict[str, torch.Tensor]:
    """A random tiny ImageReward state dict, named as the released ImageReward.pt names its tensors."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.08):
        return scale * torch.randn(*shape, generator=gen)

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + rnd(width), f"{prefix}.bias": rnd(width)}

    def linear(prefix, fan_out, fan_in, scale=None):
        return {f"{prefix}.weight": rnd(fan_out, fan_in, scale=scale or 1 / math.sqrt(fan_in)),
                f"{prefix}.bias": rnd(fan_out)}

    v, t, h = "blip.visual_encoder", "blip.text_encoder", "mlp.layers"
    state = {f"{v}.cls_token": rnd(1, 1, V_WIDTH, scale=0.5), f"{v}.pos_embed": rnd(1, (SIZE // PATCH) ** 2 + 1, V_WIDTH),
             f"{v}.patch_embed.proj.weight": rnd(V_WIDTH, 3, PATCH, PATCH, scale=0.05),
             f"{v}.patch_embed.proj.bias": rnd(V_WIDTH), **norm(f"{v}.norm", V_WIDTH)}
    for i in range(V_LAYERS):
        b = f"{v}.blocks.{i}"
        state |= {**norm(f"{b}.norm1", V_WIDTH), **linear(f"{b}.attn.qkv", 3 * V_WIDTH, V_WIDTH),
                  **linear(f"{b}.attn.proj", V_WIDTH, V_WIDTH), **norm(f"{b}.norm2", V_WIDTH),
                  **linear(f"{b}.mlp.fc1", 4 * V_WIDTH, V_WIDTH), **linear(f"{b}.mlp.fc2", V_WIDTH, 4 * V_WIDTH)}
    state |= {f"{t}.embeddings.word_embeddings.weight": rnd(N_VOCAB, T_WIDTH, scale=0.5),
              f"{t}.embeddings.position_embeddings.weight": rnd(T_POSITIONS, T_WIDTH, scale=0.5),
              f"{t}.embeddings.position_ids": torch.arange(T_POSITIONS).expand(1, -1),
              **norm(f"{t}.embeddings.LayerNorm", T_WIDTH)}
    for i in range(T_LAYERS):
        b = f"{t}.encoder.layer.{i}"
        for att, kv_in in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            state |= {**linear(f"{b}.{att}.self.query", T_WIDTH, T_WIDTH),
                      **linear(f"{b}.{att}.self.key", T_WIDTH, kv_in), **linear(f"{b}.{att}.self.value", T_WIDTH, kv_in),
                      **linear(f"{b}.{att}.output.dense", T_WIDTH, T_WIDTH), **norm(f"{b}.{att}.output.LayerNorm", T_WIDTH)}
        state |= {**linear(f"{b}.intermediate.dense", T_FFN, T_WIDTH), **linear(f"{b}.output.dense", T_WIDTH, T_FFN),
                  **norm(f"{b}.output.LayerNorm", T_WIDTH)}
    width = T_WIDTH
    for index, out in zip((0, 2, 4, 6, 7), (1024, 128, 64, 16, 1)):
        state |= linear(f"{h}.{index}", out, width)
        width = out
    state |= {**linear("blip.vision_proj", 256, V_WIDTH), **linear("blip.text_proj", 256, T_WIDTH)}
    return state


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """ImageReward.pt (pickle) beside med_config.json and the tokenizer's vocab.txt, as a user lays them out."""
    root = tmp_path_factory.mktemp("imagereward")
    torch.save(original_state(), root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "hidden_size": T_WIDTH, "num_attention_heads": T_HEADS,
        "num_hidden_layers": T_LAYERS, "intermediate_size": T_FFN, "layer_norm_eps": 1e-12, "vocab_size": N_VOCAB,
        "encoder_width": 768, "add_cross_attention": True, "hidden_act": "gelu"}))
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root


@pytest.fixture(scope="module")
def images():
    """Four images of different sizes and aspect ratios: resize and centre crop both matter."""
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (80, 48), (300, 260), (224, 224)]
    out = []
    for h, w in sizes:  # smooth colour fields plus noise, so bicubic resizing has something to do
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
        out.append(np.clip(127 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


# ---------------------------------------------------------------------------------------------
# The package's forward pass, written out directly on the original state dict


def _attention(q, k, v, heads, mask=None):
    """(B, Lq, D), (B, Lk, D) x2 -> (B, Lq, D): scaled dot-product attention over ``heads`` heads."""
    b, lq, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


def _vit(sd, pixels):
    """BLIP's VisionTransformer.forward: patch embedding, CLS, positions, pre-norm blocks, final norm."""
    p = "blip.visual_encoder."
    lin = lambda x, name: F.linear(x, sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], sd[p + name + ".weight"], sd[p + name + ".bias"], 1e-6)  # noqa: E731
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[p + "pos_embed"]
    for i in range(V_LAYERS):
        b = f"blocks.{i}."
        h = ln(x, b + "norm1")
        b_, n, d = h.shape
        qkv = lin(h, b + "attn.qkv").reshape(b_, n, 3, V_HEADS, d // V_HEADS).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (d // V_HEADS) ** -0.5).softmax(-1)
        x = x + lin((attn @ qkv[2]).transpose(1, 2).reshape(b_, n, d), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(x, "norm")


def _bert(sd, ids, mask, image_embeds):
    """BLIP's med.py BertModel.forward in multimodal mode (no pooler): self-, then cross-attention, FFN."""
    p = "blip.text_encoder."
    lin = lambda x, name: F.linear(x, sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], sd[p + name + ".weight"], sd[p + name + ".bias"], 1e-12)  # noqa: E731
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = ln(x, "embeddings.LayerNorm")
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BertModel.get_extended_attention_mask
    for i in range(T_LAYERS):
        b = f"encoder.layer.{i}."
        a = b + "attention."
        ctx = _attention(lin(x, a + "self.query"), lin(x, a + "self.key"), lin(x, a + "self.value"), T_HEADS, extended)
        x = ln(lin(ctx, a + "output.dense") + x, a + "output.LayerNorm")
        c = b + "crossattention."
        ctx = _attention(lin(x, c + "self.query"), lin(image_embeds, c + "self.key"),
                         lin(image_embeds, c + "self.value"), T_HEADS, torch.zeros(()))  # image_atts all ones
        x = ln(lin(ctx, c + "output.dense") + x, c + "output.LayerNorm")
        x = ln(lin(F.gelu(lin(x, b + "intermediate.dense")), b + "output.dense") + x, b + "output.LayerNorm")
    return x


def reference_scores(sd, tokenizer, prompts, images) -> np.ndarray:
    """ImageReward.score of each (prompt, image), one image at a time as the package runs it."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    transform = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                         lambda im: im.convert("RGB"), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    scores = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images):
            tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = _vit(sd, transform(Image.fromarray(image)).unsqueeze(0))
            cls = _bert(sd, tokens["input_ids"], tokens["attention_mask"], image_embeds)[:, 0, :]
            x = cls
            for index in (0, 2, 4, 6, 7):  # Dropout between them is off at inference; no activations
                x = F.linear(x, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
            scores.append(((x - 0.16717362830052426) / 1.0333394966054072).item())
    return np.array(scores)


# ---------------------------------------------------------------------------------------------
# Tests


def test_scores_match_the_original_forward_pass(checkpoint_dir, images):
    scorer = load_scorer(ScorerSpec("imagereward", model=str(checkpoint_dir)), allow_pickle=True)
    tokenizer = imagereward.load_tokenizer(str(checkpoint_dir))
    assert len(tokenizer) == N_VOCAB and tokenizer.convert_tokens_to_ids("[ENC]") == N_VOCAB - 1
    prompts = PROMPTS
    expected = reference_scores(original_state(), tokenizer, prompts, images)
    got = np.concatenate([scorer([p], im[None]) for p, im in zip(prompts, images)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # LayerNorm eps 1e-5 for 1e-6 is seen
    assert np.ptp(expected) > 0.05  # the scores tell the pairs apart: the comparison is not of constants
    # a batch of same-sized images gives the same scores as one at a time
    same = [images[1], images[1][:, ::-1].copy(), images[1][::-1].copy()]
    np.testing.assert_allclose(scorer(prompts[:3], np.stack(same)), reference_scores(
        original_state(), tokenizer, prompts[:3], same), rtol=0, atol=1e-6)


def test_safetensors_checkpoint_needs_no_pickle_opt_in(checkpoint_dir, images, tmp_path):
    for name in ("med_config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((checkpoint_dir / name).read_bytes())
    save_file({k: v.contiguous() for k, v in original_state().items()}, str(tmp_path / "ImageReward.safetensors"))
    spec = ScorerSpec("imagereward", model=str(tmp_path / "ImageReward.safetensors"))
    check_scorer(spec)
    pickled = load_scorer(ScorerSpec("imagereward", model=str(checkpoint_dir)), allow_pickle=True)
    np.testing.assert_array_equal(load_scorer(spec)(PROMPTS[:1], images[3][None]),
                                  pickled(PROMPTS[:1], images[3][None]))


def test_the_real_checkpoints_shapes_give_imagereward_s_architecture():
    """The released ImageReward.pt's shapes (ViT-L/16 at 224, BERT-base with cross-attention, vocab 30524):
    every tensor maps onto a parameter of that shape (models built on the meta device, no weights)."""
    from transformers import BlipTextModel, BlipVisionModel

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    shapes = {v + "cls_token": (1, 1, 1024), v + "pos_embed": (1, 197, 1024), v + "patch_embed.proj.weight":
              (1024, 3, 16, 16), v + "patch_embed.proj.bias": (1024,), v + "norm.weight": (1024,), v + "norm.bias": (1024,)}
    for i in range(24):
        shapes |= {f"{v}blocks.{i}.norm1.weight": (1024,), f"{v}blocks.{i}.norm1.bias": (1024,),
                   f"{v}blocks.{i}.attn.qkv.weight": (3072, 1024), f"{v}blocks.{i}.attn.qkv.bias": (3072,),
                   f"{v}blocks.{i}.attn.proj.weight": (1024, 1024), f"{v}blocks.{i}.attn.proj.bias": (1024,),
                   f"{v}blocks.{i}.norm2.weight": (1024,), f"{v}blocks.{i}.norm2.bias": (1024,),
                   f"{v}blocks.{i}.mlp.fc1.weight": (4096, 1024), f"{v}blocks.{i}.mlp.fc1.bias": (4096,),
                   f"{v}blocks.{i}.mlp.fc2.weight": (1024, 4096), f"{v}blocks.{i}.mlp.fc2.bias": (1024,)}
    shapes |= {t + "embeddings.word_embeddings.weight": (30524, 768), t + "embeddings.position_embeddings.weight":
               (512, 768), t + "embeddings.LayerNorm.weight": (768,), t + "embeddings.LayerNorm.bias": (768,)}
    for i in range(12):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", 768), ("crossattention", 1024)):
            shapes |= {b + f"{att}.self.query.weight": (768, 768), b + f"{att}.self.query.bias": (768,),
                       b + f"{att}.self.key.weight": (768, kv), b + f"{att}.self.key.bias": (768,),
                       b + f"{att}.self.value.weight": (768, kv), b + f"{att}.self.value.bias": (768,),
                       b + f"{att}.output.dense.weight": (768, 768), b + f"{att}.output.dense.bias": (768,),
                       b + f"{att}.output.LayerNorm.weight": (768,), b + f"{att}.output.LayerNorm.bias": (768,)}
        shapes |= {b + "intermediate.dense.weight": (3072, 768), b + "intermediate.dense.bias": (3072,),
                   b + "output.dense.weight": (768, 3072), b + "output.dense.bias": (768,),
                   b + "output.LayerNorm.weight": (768,), b + "output.LayerNorm.bias": (768,)}
    width = 768
    for index, out in zip((0, 2, 4, 6, 7), (1024, 128, 64, 16, 1)):
        shapes |= {f"mlp.layers.{index}.weight": (out, width), f"mlp.layers.{index}.bias": (out,)}
        width = out
    vision, text, head_in = imagereward.architecture(shapes, "ImageReward.pt")
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size,
            vision.patch_size, vision.intermediate_size, vision.layer_norm_eps) == (1024, 24, 16, 224, 16, 4096, 1e-6)
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.encoder_hidden_size, text.intermediate_size, text.layer_norm_eps) == (30524, 768, 12, 12, 1024, 3072,
                                                                                        1e-12)
    assert head_in == 768
    with torch.device("meta"):
        models = {"vision": BlipVisionModel(vision), "text": BlipTextModel(text, add_pooling_layer=False)}
    parts = imagereward.split_state({k: torch.empty(s, device="meta") for k, s in shapes.items()}, "ImageReward.pt")
    for part, model in models.items():
        own = {k: tuple(p.shape) for k, p in model.state_dict().items()}
        assert {k: tuple(x.shape) for k, x in parts[part].items()} == own
        assert all(imagereward.original_key(part, k) in shapes for k in own)


def test_key_mapping_names_the_original_layout():
    assert imagereward.map_key("blip.visual_encoder.blocks.23.attn.qkv.weight") == (
        "vision", "encoder.layers.23.self_attn.qkv.weight")
    assert imagereward.map_key("blip.visual_encoder.norm.bias") == ("vision", "post_layernorm.bias")
    assert imagereward.map_key("blip.text_encoder.encoder.layer.3.crossattention.self.key.weight") == (
        "text", "encoder.layer.3.crossattention.self.key.weight")
    assert imagereward.map_key("mlp.layers.7.bias") == ("head", "7.bias")
    assert imagereward.map_key("blip.text_proj.weight") is None
    assert imagereward.original_key("vision", "encoder.layers.5.self_attn.projection.bias") == \
        "blip.visual_encoder.blocks.5.attn.proj.bias"


@pytest.mark.parametrize("case, message", [
    ("pickle", r"scorer 'imagereward', model: .*ImageReward.pt is a pickle file.*allow_pickle=true"),
    ("empty_folder", r"scorer 'imagereward', model: .* holds neither ImageReward.safetensors nor ImageReward.pt"),
    ("missing_key", r"scorer 'imagereward', model: .* lacks 'blip.visual_encoder.pos_embed'"),
    ("missing_block", r"scorer 'imagereward', model: .*missing \['blip.visual_encoder.blocks.1.attn.qkv.weight'\]"),
    ("unknown_key", r"scorer 'imagereward', model: .* has key 'blip.itm_head.weight', which ImageReward does not have"),
    ("vocab", rf"scorer 'imagereward', processor: the tokenizer .* has {N_VOCAB - 1} tokens with \[DEC\] and \[ENC\], "
              rf"but .* embeds {N_VOCAB}"),
    ("no_tokenizer", r"scorer 'imagereward', processor: .*empty holds no vocab.txt or tokenizer.json"),
    ("head_width", r"scorer 'imagereward', model: .* the reward MLP reads 32-d features but the text encoder gives "
                   r"64-d ones"),
])
def test_bad_checkpoints_are_refused_naming_the_field(checkpoint_dir, tmp_path, case, message):
    state = original_state()
    folder = tmp_path / "ir"
    folder.mkdir()
    (folder / "med_config.json").write_bytes((checkpoint_dir / "med_config.json").read_bytes())
    vocab = VOCAB[:-1] if case == "vocab" else VOCAB
    if case != "no_tokenizer":
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "empty").mkdir()  # a tokenizer folder without the tokenizer
    if case == "missing_key":
        del state["blip.visual_encoder.pos_embed"]
    elif case == "missing_block":
        del state["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    elif case == "unknown_key":
        state["blip.itm_head.weight"] = torch.zeros(2, T_WIDTH)
    elif case == "head_width":
        state["mlp.layers.0.weight"] = torch.zeros(1024, 32)
    if case == "pickle":
        torch.save(state, folder / "ImageReward.pt")
    elif case != "empty_folder":
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "ImageReward.safetensors"))
    spec = ScorerSpec("imagereward", model=str(folder),
                      processor=str(tmp_path / "empty") if case == "no_tokenizer" else None)
    for run in (check_scorer, load_scorer):
        with pytest.raises(HgdpoError, match=message):
            run(spec)
