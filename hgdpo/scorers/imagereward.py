"""ImageReward (Xu et al., NeurIPS 2023) on transformers' own BLIP classes, without the ``image-reward`` package.

The package cannot be installed beside this stack (it pins ``timm==0.6.13`` and imports helpers that
transformers 5 removed), so its released checkpoint (``ImageReward.pt``, a state dict) is loaded
here into ``transformers.BlipVisionModel`` + ``BlipTextModel`` and an ``nn.Sequential`` head. The
forward pass is the package's ``ImageReward.score``:

1. image: resized bicubic so its short side is 224, centre-cropped to 224 x 224, scaled to [0, 1],
   normalised with CLIP's mean and std (``torchvision``, as the package does);
2. BLIP's ViT-L/16 (24 layers, width 1024, 16 heads, LayerNorm eps 1e-6) gives the image tokens
   after its final LayerNorm (all 197 of them);
3. the prompt, tokenized by ``bert-base-uncased`` with BLIP's ``[DEC]`` and ``[ENC]`` tokens added
   (vocabulary 30524), padded and truncated to 35 tokens (the first token stays ``[CLS]``), goes
   through BLIP's BERT-base text encoder (12 layers, width 768), whose every layer cross-attends to
   all image tokens after its self-attention;
4. the CLS token's feature (768) goes through an MLP 768-1024-128-64-16-1 of Linear layers with
   no activation between them (the released head; Dropout only in training);
5. score = (mlp(CLS) - 0.16717362830052426) / 1.0333394966054072.

Key mapping, from the checkpoint's names (left) to the models built here (right; ``i`` a layer):

==========================================================  ==============================================
``blip.visual_encoder.cls_token``                           vision ``embeddings.class_embedding``
``blip.visual_encoder.pos_embed``                           vision ``embeddings.position_embedding``
``blip.visual_encoder.patch_embed.proj.{weight,bias}``      vision ``embeddings.patch_embedding.*``
``blip.visual_encoder.blocks.i.norm1.*``                    vision ``encoder.layers.i.layer_norm1.*``
``blip.visual_encoder.blocks.i.attn.qkv.*``                 vision ``encoder.layers.i.self_attn.qkv.*``
``blip.visual_encoder.blocks.i.attn.proj.*``                vision ``encoder.layers.i.self_attn.projection.*``
``blip.visual_encoder.blocks.i.norm2.*``                    vision ``encoder.layers.i.layer_norm2.*``
``blip.visual_encoder.blocks.i.mlp.fc{1,2}.*``              vision ``encoder.layers.i.mlp.fc{1,2}.*``
``blip.visual_encoder.norm.*``                              vision ``post_layernorm.*``
``blip.text_encoder.<name>``                                text ``<name>`` (BLIP's ``med.py`` BERT and
                                                            ``BlipTextModel`` share every name)
``mlp.layers.{0,2,4,6,7}.*``                                head ``{0,2,4,6,7}.*`` (Dropout at 1, 3, 5)
``blip.vision_proj.*``, ``blip.text_proj.*``,               not used by the score: ignored
``blip.text_encoder.embeddings.position_ids``
==========================================================  ==============================================

The fused ``qkv`` projection is copied as it is: both ViTs split it as (3, heads, head dim).
The architecture is read from the tensors' shapes (widths, layer counts, patch and image size,
vocabulary), so the tests run the same code on a tiny model saved in the original layout. Head
counts are not in the shapes: the text encoder's come from ``med_config.json`` beside the
checkpoint when it is there, and otherwise, like the vision tower's, from BLIP's 64-wide heads
(ViT-L 1024 / 16, BERT-base 768 / 12).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from hgdpo.models.loading import HUB_ID
from hgdpo.scorers.base import Scorer, ScorerError, ScorerSpec, Setting
from hgdpo.scorers.heads import new_head
from hgdpo.scorers.weights import read_state_dict, tensor_shapes, weights_file

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # the package's normalisation of the raw reward
MAX_LENGTH = 35  # tokens per prompt, as the package pads and truncates
IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER = "google-bert/bert-base-uncased"
BLIP_TOKENS = ("[DEC]", "[ENC]")  # BLIP's bos token and its one additional special token
HEAD_DIM = 64
VISION_EPS, TEXT_EPS = 1e-6, 1e-12
BATCH = 16  # images per forward pass

VISION = "blip.visual_encoder."
TEXT = "blip.text_encoder."
HEAD = "mlp.layers."
IGNORED = re.compile(r"^(blip\.vision_proj\.|blip\.text_proj\.|blip\.text_encoder\.embeddings\.position_ids$)")
_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")


def _err(field: str, message: str) -> ScorerError:
    return ScorerError("imagereward", field, message)


def map_key(key: str) -> tuple[str, str] | None:
    """A checkpoint key -> (``vision`` | ``text`` | ``head``, the key in that model); None for a key the score
    does not use. Raises ``KeyError`` for a key ImageReward does not have."""
    if IGNORED.match(key):
        return None
    if key.startswith(VISION):
        rest = key[len(VISION):]
        if rest in _VISION_TOP:
            return "vision", _VISION_TOP[rest]
        found = _BLOCK_KEY.match(rest)
        if found:
            return "vision", f"encoder.layers.{found[1]}.{_VISION_BLOCK[found[2]]}.{found[3]}"
    elif key.startswith(TEXT):
        return "text", key[len(TEXT):]
    elif key.startswith(HEAD):
        return "head", key[len(HEAD):]
    raise KeyError(key)


def original_key(part: str, key: str) -> str:
    """The inverse of ``map_key``: where a model's parameter comes from in the checkpoint."""
    if part == "vision":
        top = {v: k for k, v in _VISION_TOP.items()}
        if key in top:
            return VISION + top[key]
        layer, rest = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(?:weight|bias)$", key).groups()
        block = {v: k for k, v in _VISION_BLOCK.items()}[rest]
        return f"{VISION}blocks.{layer}.{block}.{key.rsplit('.', 1)[1]}"
    return (TEXT if part == "text" else HEAD) + key


def split_state(state: dict, where: str) -> dict[str, dict]:
    """The checkpoint's tensors by model (``vision``, ``text``, ``head``), renamed (see the module docstring)."""
    parts: dict[str, dict] = {"vision": {}, "text": {}, "head": {}}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for key, value in state.items():
        try:
            mapped = map_key(key)
        except KeyError:
            raise _err("model", f"{where} has key {key!r}, which ImageReward does not have (expected "
                                f"{VISION}*, {TEXT}*, {HEAD}*)") from None
        if mapped is not None:
            parts[mapped[0]][mapped[1]] = value
    return parts


def _shape(shapes: dict, key: str, where: str) -> tuple[int, ...]:
    if key not in shapes:
        raise _err("model", f"{where} lacks {key!r}: not an ImageReward checkpoint (or a damaged one)")
    return tuple(shapes[key])


def _layers(shapes: dict, pattern: str) -> int:
    found = {int(m[1]) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _heads(width: int, heads: int | None, what: str, where: str) -> int:
    heads = heads if heads is not None else max(width // HEAD_DIM, 1)
    if width % heads:
        raise _err("model", f"{where}: the {what} width {width} is not a multiple of its {heads} attention heads")
    return heads


def architecture(shapes: dict, where: str, med_config: dict | None = None):
    """``(BlipVisionConfig, BlipTextConfig, head input width)`` of a checkpoint, from the shapes of its tensors
    (original names) and, when given, ImageReward's ``med_config.json`` (text heads and LayerNorm eps)."""
    from transformers import BlipTextConfig, BlipVisionConfig  # heavy: not loaded when configs are checked

    med_config = med_config or {}
    width, patch = _shape(shapes, VISION + "patch_embed.proj.weight", where)[0], \
        _shape(shapes, VISION + "patch_embed.proj.weight", where)[-1]
    positions = _shape(shapes, VISION + "pos_embed", where)[1]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise _err("model", f"{where}: {VISION}pos_embed has {positions} positions, not a square grid plus CLS")
    vision_layers = _layers(shapes, re.escape(VISION) + r"blocks\.(\d+)\.")
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=_shape(shapes, VISION + "blocks.0.mlp.fc1.weight", where)[0],
        num_hidden_layers=vision_layers, num_attention_heads=_heads(width, None, "vision", where),
        patch_size=patch, image_size=grid * patch, layer_norm_eps=VISION_EPS, hidden_act="gelu")
    vocab, text_width = _shape(shapes, TEXT + "embeddings.word_embeddings.weight", where)
    prefix = TEXT + "encoder.layer.0."
    text = BlipTextConfig(
        vocab_size=vocab, hidden_size=text_width,
        encoder_hidden_size=_shape(shapes, prefix + "crossattention.self.key.weight", where)[1],
        intermediate_size=_shape(shapes, prefix + "intermediate.dense.weight", where)[0],
        num_hidden_layers=_layers(shapes, re.escape(TEXT) + r"encoder\.layer\.(\d+)\."),
        num_attention_heads=_heads(text_width, med_config.get("num_attention_heads"), "text", where),
        max_position_embeddings=_shape(shapes, TEXT + "embeddings.position_embeddings.weight", where)[0],
        layer_norm_eps=med_config.get("layer_norm_eps", TEXT_EPS), hidden_act="gelu", pad_token_id=0,
        bos_token_id=None, eos_token_id=None, sep_token_id=None,  # the encoder generates nothing
        is_decoder=True)  # builds the cross-attention layers; the forward pass itself is bidirectional
    if text.encoder_hidden_size != width:
        raise _err("model", f"{where}: the text encoder cross-attends to {text.encoder_hidden_size}-d features but "
                            f"the ViT gives {width}-d ones")
    head_in = _shape(shapes, HEAD + "0.weight", where)[1]
    if head_in != text_width:
        raise _err("model", f"{where}: the reward MLP reads {head_in}-d features but the text encoder gives "
                            f"{text_width}-d ones")
    return vision, text, head_in


def load_tokenizer(location: str):
    """BERT's tokenizer with BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens, as ImageReward builds it."""
    from transformers import BertTokenizer  # heavy: not loaded when configs are checked

    folder = Path(location).expanduser()
    if folder.exists() and not any((folder / n).is_file() for n in ("vocab.txt", "tokenizer.json")):
        # transformers 5 would build an empty 5-token tokenizer from such a folder without a word
        raise _err("processor", f"{location} holds no vocab.txt or tokenizer.json (bert-base-uncased's); put them "
                                f"there, or name a BERT tokenizer folder or hub id")
    try:
        tokenizer = BertTokenizer.from_pretrained(location)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _err("processor", f"could not load the BERT tokenizer {location!r} ({first}); put "
                                f"bert-base-uncased's vocab.txt beside the checkpoint, or name its folder") from None
    tokenizer.add_special_tokens({"bos_token": BLIP_TOKENS[0]})
    tokenizer.add_special_tokens({"additional_special_tokens": [BLIP_TOKENS[1]]})
    return tokenizer


def check_vocabulary(tokenizer, vocab: int, location: str, where: str) -> None:
    if len(tokenizer) != vocab:
        raise _err("processor", f"the tokenizer {location!r} has {len(tokenizer)} tokens with [DEC] and [ENC], "
                                f"but {where} embeds {vocab} (bert-base-uncased + 2 = 30524)")


def preprocess(images: np.ndarray):
    """(B, H, W, 3) uint8 -> (B, 3, 224, 224) float32: the package's bicubic resize, centre crop, CLIP norm."""
    import torch  # heavy: not loaded when configs are checked
    from torchvision import transforms  # imports torch: heavy, as above

    transform = transforms.Compose([
        transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(IMAGE_SIZE), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    return torch.stack([transform(Image.fromarray(image)) for image in images])


def _models(vision_cfg, text_cfg, head_in: int) -> dict:
    from transformers import BlipTextModel, BlipVisionModel  # heavy: not loaded when configs are checked

    return {"vision": BlipVisionModel(vision_cfg), "text": BlipTextModel(text_cfg, add_pooling_layer=False),
            "head": new_head(head_in)}


def check_fit(shapes: dict, where: str, med_config: dict | None = None):
    """Refuse a checkpoint whose tensors (name -> shape, original names) do not give exactly ImageReward's
    parameters; return its ``architecture``. Builds the models on the meta device: no memory, no weights."""
    import torch  # heavy: not loaded when configs are checked

    arch = architecture(shapes, where, med_config)
    parts = split_state(shapes, where)
    with torch.device("meta"):
        models = _models(*arch)
    for part, model in models.items():
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(original_key(part, k) for k in own if k not in parts[part])
        extra = sorted(original_key(part, k) for k in parts[part] if k not in own)
        if missing or extra:
            raise _err("model", f"{where} does not fit ImageReward's architecture (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
        for key, shape in own.items():
            if tuple(parts[part][key]) != shape:
                raise _err("model", f"{where}: {original_key(part, key)} has shape {tuple(parts[part][key])}, "
                                    f"expected {shape}")
    return arch


def build(state: dict, tokenizer, where: str, med_config: dict | None = None, device: str = "cpu"):
    """An ``ImageRewardScorer`` from the checkpoint's state dict (original names) and the tokenizer."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    vision_cfg, text_cfg, head_in = check_fit(shapes, where, med_config)
    check_vocabulary(tokenizer, text_cfg.vocab_size, getattr(tokenizer, "name_or_path", "?"), where)
    parts = split_state(state, where)
    models = _models(vision_cfg, text_cfg, head_in)
    for part, model in models.items():
        model.load_state_dict({k: v.float() for k, v in parts[part].items()}, strict=True)
        model.eval().to(device)
    return ImageRewardScorer(tokenizer, models["vision"], models["text"], models["head"])


class ImageRewardScorer(Scorer):
    """ImageReward's normalised reward of (prompt, image) pairs (float32 models).

    ``model``: ImageReward.pt or a .safetensors of its state dict, or their folder (``med_config.json``
    beside it is read when there), required; ``processor``: the BERT tokenizer folder or hub id, by default
    the checkpoint's folder when it holds one (vocab.txt or tokenizer.json), else bert-base-uncased."""

    name = "imagereward"
    required_model = "the ImageReward checkpoint (ImageReward.pt, or a .safetensors of its state dict) or its folder"
    model_setting = Setting("imagereward_model", "ImageReward checkpoint file (ImageReward.pt) or folder.")
    batch = BATCH

    def __init__(self, tokenizer, vision, text, head):
        self.tokenizer, self.vision, self.text, self.head = tokenizer, vision, text, head

    @classmethod
    def files(cls, spec: ScorerSpec, allow_pickle: bool) -> tuple[Path, dict | None, str]:
        """(checkpoint, med_config.json's settings or None, tokenizer location)."""
        path = Path(cls.required(spec)).expanduser()
        if path.is_dir():
            found = [path / n for n in ("ImageReward.safetensors", "ImageReward.pt") if (path / n).is_file()]
            if not found:
                raise _err("model", f"{path} holds neither ImageReward.safetensors nor ImageReward.pt")
            path = found[0]
        checkpoint = weights_file(cls.name, "model", str(path), allow_pickle)
        med_config = None
        med_file = checkpoint.parent / "med_config.json"
        if med_file.is_file():
            try:
                med_config = json.loads(med_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise _err("model", f"{med_file} is not valid JSON: {err}") from None
            if not isinstance(med_config, dict):
                raise _err("model", f"{med_file} is not a BERT config (a JSON object expected)")
        tokenizer = cls.processor_of(spec)
        if tokenizer is None:
            beside = any((checkpoint.parent / n).is_file() for n in ("vocab.txt", "tokenizer.json"))
            tokenizer = str(checkpoint.parent) if beside else TOKENIZER
        elif not Path(tokenizer).expanduser().exists() and not HUB_ID.match(tokenizer):
            raise _err("processor", f"{tokenizer} does not exist (expected a BERT tokenizer folder or a hub id such "
                                    f"as {TOKENIZER})")
        return checkpoint, med_config, tokenizer

    @classmethod
    def check(cls, spec: ScorerSpec, allow_pickle: bool = False) -> None:
        checkpoint, med_config, tokenizer_loc = cls.files(spec, allow_pickle)
        _, text, _ = check_fit(tensor_shapes(checkpoint, cls.name), str(checkpoint), med_config)
        check_vocabulary(load_tokenizer(tokenizer_loc), text.vocab_size, tokenizer_loc, str(checkpoint))

    @classmethod
    def load(cls, spec: ScorerSpec, *, allow_pickle: bool = False, device: str = "cpu", dtype=None,
             attention: str | None = None) -> ImageRewardScorer:
        checkpoint, med_config, tokenizer_loc = cls.files(spec, allow_pickle)
        state = read_state_dict(checkpoint, cls.name)
        return build(state, load_tokenizer(tokenizer_loc), str(checkpoint), med_config, device=device)

    def score_batch(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        import torch  # heavy: not loaded when configs are checked

        device = next(self.head.parameters()).device
        with torch.no_grad():
            pixels = preprocess(images).to(device)
            tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                    return_tensors="pt").to(device)
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # (b, 1 + patches, D_v)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
            text_out = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
            cls = text_out.last_hidden_state[:, 0, :].float()  # (b, D_t)
            return ((self.head(cls).squeeze(-1) - MEAN) / STD).double().cpu().numpy()
