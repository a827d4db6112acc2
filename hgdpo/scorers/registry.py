"""The evaluation's scorers: each rates (prompt, image) pairs, higher = better (paper §4).

A scorer is named by a ``ScorerSpec``: its name, the ``model`` it loads (hub id, local folder or
file; ``None`` takes the default below) and, where it is separate, the ``processor`` (the
tokenizer / image processor / CLIP backbone / architecture it needs).

=============  ==============================================  =====================================
name           model (default)                                 processor (default)
=============  ==============================================  =====================================
judge          none: the miniature world's program             none
pickscore      CLIP folder or hub id (``embedded``: the        processor folder or hub id (the
               world's PickScore; real: yuvalkirstain/         model's own; real:
               PickScore_v1)                                   laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
clip           CLIP folder or hub id (``embedded``: the        the model's own
               world's CLIP; real: openai/clip-vit-large-
               patch14)
aesthetic      LAION aesthetic MLP weights, required           the CLIP it reads embeddings of
               (sac+logos+ava1-l14-linearMSE.pth or its        (openai/clip-vit-large-patch14)
               .safetensors)
hpsv2          HPSv2 checkpoint, required (HPS_v2_compressed.  open_clip architecture name or a
               pt, HPS_v2.1_compressed.pt, or a .safetensors   model-config .json (ViT-H-14)
               of its state_dict)
imagereward    ImageReward.pt or a .safetensors of its state   BERT tokenizer folder or hub id
               dict (or their folder; med_config.json beside   (default: the checkpoint's folder
               it is read when there), required                if it holds vocab.txt, else
                                                               google-bert/bert-base-uncased)
=============  ==============================================  =====================================

Scores: judge in [0, 1]; PickScore ``logit_scale * cos``; CLIP score ``100 * max(cos, 0)``; the
aesthetic MLP's rating (on AVA's 1-10 scale) of the L2-normalised CLIP image embedding; HPSv2 the
cosine of its normalised image and text embeddings (what HPSv2's own ``score`` returns, not x100);
ImageReward its normalised reward (``hgdpo.scorers.imagereward``, on transformers' BLIP classes). Win rates
need only the order within a scorer.

Weights are read from safetensors only unless ``allow_pickle`` (pickle can run code when
loaded); pickle files are then read with ``torch.load(weights_only=True)``. ``check_scorer`` and
``check_prompts`` refuse bad input before any work, without loading big weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from hgdpo.config.sections import SCORER_NAMES
from hgdpo.errors import HgdpoError
from hgdpo.models import embedded
from hgdpo.models.loading import HUB_ID, PICKLE_SUFFIXES

CLIP_L14 = "openai/clip-vit-large-patch14"
HPS_ARCHITECTURE = "ViT-H-14"
BATCH = 16  # images per forward pass: bounds memory for ViT-H-sized scorers

# (model, processor) used when a ScorerSpec leaves them unset; None: the model's own / not needed.
DEFAULTS: dict[str, tuple[str | None, str | None]] = {
    "judge": (None, None),
    "pickscore": (embedded.EMBEDDED, None),
    "clip": (embedded.EMBEDDED, None),
    "aesthetic": (None, CLIP_L14),
    "hpsv2": (None, HPS_ARCHITECTURE),
    "imagereward": (None, None),
}
# What a scorer's required `model` is, for the error when it is missing.
REQUIRED_MODEL = {
    "aesthetic": "the LAION aesthetic MLP weights (sac+logos+ava1-l14-linearMSE.pth, or a .safetensors of them)",
    "hpsv2": "the HPSv2 checkpoint (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt, or a .safetensors of its "
             "state_dict)",
    "imagereward": "the ImageReward checkpoint (ImageReward.pt, or a .safetensors of its state dict) or its folder",
}
# The released LAION "improved aesthetic predictor": Linear layers at these nn.Sequential indices
# (Dropout between them, no activations); input = the CLIP embedding width (768 for ViT-L/14).
AESTHETIC_LAYERS = (0, 2, 4, 6, 7)
AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
AESTHETIC_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer: its name, and where its weights and processor come from."""

    name: str  # one of SCORER_NAMES
    model: str | None = None  # hub id, local folder or file; None: the scorer's default
    processor: str | None = None  # processor / tokenizer / CLIP backbone / architecture, when separate

    def resolved_model(self) -> str | None:
        """``model``, or the scorer's default."""
        return self.model if self.model is not None else DEFAULTS[self.name][0]

    def resolved_processor(self) -> str | None:
        """``processor``, or the scorer's default (None: the model's own, or none needed)."""
        return self.processor if self.processor is not None else DEFAULTS[self.name][1]


class Scorer(Protocol):
    """A loaded scorer: ``scorer(prompts, images)`` -> (B,) float64, higher = better."""

    name: str

    def __call__(self, prompts: list[str], images: np.ndarray) -> np.ndarray: ...


def _err(scorer: str, field: str, message: str) -> HgdpoError:
    return HgdpoError(f"scorer {scorer!r}, {field}: {message}")


def _batch(prompts: list[str], images: np.ndarray) -> np.ndarray:
    """Check the (prompts, images) contract shared by every scorer; returns the images as uint8."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return images


def _by_prompt(prompts: list[str]) -> dict[str, list[int]]:
    """Indices of each distinct prompt, in first-seen order (for scorers that take one prompt at a time)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return groups


def _pooled(out):
    import torch

    # transformers 5 returns an output object whose projected embedding is `.pooler_output`.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------------------------------------
# Where weights come from


def _required(spec: ScorerSpec) -> str:
    model = spec.resolved_model()
    if model is None:
        raise _err(spec.name, "model", f"required: {REQUIRED_MODEL[spec.name]}")
    return model


def _weights_file(scorer: str, field: str, name: str, allow_pickle: bool) -> Path:
    """A weights file: it exists, and it is safetensors, or pickle with the user's opt-in."""
    path = Path(name).expanduser()
    if not path.exists():
        raise _err(scorer, field, f"{path} does not exist")
    if not path.is_file():
        raise _err(scorer, field, f"{path} is a folder; a weights file is expected")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _err(scorer, field, f"{path} is a pickle file, which can run code when loaded; convert it to "
                                      f".safetensors, or set allow_pickle=true if you trust it")
    elif path.suffix != ".safetensors":
        raise _err(scorer, field, f"{path} is not a weights file (.safetensors; {', '.join(PICKLE_SUFFIXES)} "
                                  f"with allow_pickle=true)")
    return path


def _unwrap(obj, scorer: str, field: str, path: Path) -> dict:
    """The state dict inside a checkpoint (``{"state_dict": ...}`` as HPSv2 ships, or bare), without
    the ``module.`` prefix that DataParallel training leaves."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    import torch

    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _err(scorer, field, f"{path} holds no state dict of tensors (got {type(obj).__name__} with keys "
                                  f"{list(obj)[:4] if isinstance(obj, dict) else []})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _torch_load(path: Path, scorer: str, field: str, *, mmap: bool) -> dict:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # a pre-zip (legacy) torch file cannot be mapped
            return _torch_load(path, scorer, field, mmap=False)
        raise _err(scorer, field, f"{path} is not a readable torch checkpoint ({err})") from None
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise _err(scorer, field, f"{path} holds Python objects besides tensors, which are not loaded even with "
                                  f"allow_pickle ({first}); save its state_dict as .safetensors") from None
    except (EOFError, OSError, ValueError) as err:
        raise _err(scorer, field, f"{path} is not a readable torch checkpoint ({err})") from None
    return _unwrap(obj, scorer, field, path)


def tensor_shapes(path: Path, scorer: str = "?", field: str = "model") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a weights file, read without loading the weights
    (safetensors header; a pickle checkpoint memory-mapped)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # safetensors raises several types for a damaged header
            raise _err(scorer, field, f"{path} is not a readable safetensors file: {err}") from None
    return {k: tuple(v.shape) for k, v in _torch_load(path, scorer, field, mmap=True).items()}


def read_state_dict(path: Path, scorer: str = "?", field: str = "model") -> dict:
    """All tensors of a weights file (safetensors, or pickle through ``torch.load(weights_only=True)``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise _err(scorer, field, f"{path} is not a readable safetensors file: {err}") from None
        return _unwrap(state, scorer, field, path)
    return _torch_load(path, scorer, field, mmap=False)


def _clip_location(scorer: str, field: str, name: str, *, processor_only: bool = False) -> str:
    """``embedded``, a transformers CLIP folder, or a hub id -> the folder path or the hub id."""
    if name == embedded.EMBEDDED:
        return str(embedded.scorer_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if processor_only:
            if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
                raise _err(scorer, field, f"{path} is not a CLIP processor folder (no processor_config.json or "
                                          f"preprocessor_config.json)")
            return str(path.resolve())
        config = path / "config.json"
        if not config.is_file():
            raise _err(scorer, field, f"{path} is not a transformers model folder (no config.json)")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise _err(scorer, field, f"{config} is not a model config ({err})") from None
        if model_type != "clip":
            raise _err(scorer, field, f"{path} holds a {model_type!r} model, not CLIP (model_type in config.json)")
        return str(path.resolve())
    if path.exists():
        raise _err(scorer, field, f"{path} is a file; a CLIP model folder or a hub id is expected")
    if HUB_ID.match(name) and not name.startswith((".", "~")):
        return name
    raise _err(scorer, field, f"{name} does not exist (expected `embedded`, a CLIP model folder or a hub id)")


def _check_clip(scorer: str, model_loc: str, proc_loc: str, allow_pickle: bool) -> None:
    """The CLIP model's config and its processor load (cheap; configs and tokenizer files only)."""
    from hgdpo.models import loading as models

    try:
        models.check_scorer(model_loc, proc_loc, allow_pickle=allow_pickle)
    except HgdpoError as err:
        raise HgdpoError(f"scorer {scorer!r}: {err}") from None


def _load_clip(scorer: str, model_loc: str, proc_loc: str, allow_pickle: bool, device: str):
    """``(processor, CLIPModel)`` through ``hgdpo.models.loading.load_scorer``."""
    from hgdpo.models import loading as models

    try:
        return models.load_scorer(model_loc, proc_loc, allow_pickle=allow_pickle, device=device)
    except HgdpoError as err:
        raise HgdpoError(f"scorer {scorer!r}: {err}") from None


# ---------------------------------------------------------------------------------------------
# judge


class JudgeScorer:
    """The miniature world's programmatic judge (``hgdpo.world.judge``): in [0, 1], no model."""

    name = "judge"

    def __call__(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        from hgdpo.world.judge import judge_batch

        return judge_batch(_batch(prompts, images), prompts)


def _check_judge(spec: ScorerSpec, allow_pickle: bool) -> None:
    for field in ("model", "processor"):
        if getattr(spec, field) is not None:
            raise _err("judge", field, "the judge is a program and loads no model; leave it unset")


def _load_judge(spec: ScorerSpec, allow_pickle: bool, device: str) -> JudgeScorer:
    _check_judge(spec, allow_pickle)
    return JudgeScorer()


# ---------------------------------------------------------------------------------------------
# pickscore and clip


class PickScoreScorer:
    """PickScore (``hgdpo.scorers.pickscore.pickscore``), one prompt's images at a time."""

    name = "pickscore"

    def __init__(self, processor, model):
        self.processor, self.model = processor, model

    def __call__(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        from hgdpo.scorers.pickscore import pickscore

        images = _batch(prompts, images)
        scores = np.zeros(len(images), np.float64)
        for prompt, idx in _by_prompt(prompts).items():
            for start in range(0, len(idx), BATCH):
                part = idx[start:start + BATCH]
                scores[part] = pickscore(self.processor, self.model, prompt, images[part])
        return scores


class ClipScorer:
    """CLIP score: ``100 * max(cos(text embedding, image embedding), 0)`` of a CLIP model."""

    name = "clip"

    def __init__(self, processor, model):
        self.processor, self.model = processor, model
        self.max_length = model.config.text_config.max_position_embeddings

    def __call__(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        import torch

        images = _batch(prompts, images)
        device = next(self.model.parameters()).device
        scores = []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                part = slice(start, start + BATCH)
                pixels = self.processor(images=list(images[part]), return_tensors="pt")["pixel_values"]
                text = self.processor(text=list(prompts[part]), padding=True, truncation=True,
                                      max_length=self.max_length, return_tensors="pt")
                image_emb = _pooled(self.model.get_image_features(pixel_values=pixels.to(device)))  # (b, D)
                text_emb = _pooled(self.model.get_text_features(input_ids=text["input_ids"].to(device),
                                                                attention_mask=text["attention_mask"].to(device)))
                cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)  # (b,)
                scores.append(100 * cos.clamp(min=0).double().cpu().numpy())
        return np.concatenate(scores)


def _clip_pair(spec: ScorerSpec) -> tuple[str, str]:
    model_loc = _clip_location(spec.name, "model", spec.resolved_model())
    proc = spec.resolved_processor()
    proc_loc = model_loc if proc is None else _clip_location(spec.name, "processor", proc, processor_only=True)
    return model_loc, proc_loc


def _check_clip_scorer(spec: ScorerSpec, allow_pickle: bool) -> None:
    _check_clip(spec.name, *_clip_pair(spec), allow_pickle)


def _load_pickscore(spec: ScorerSpec, allow_pickle: bool, device: str) -> PickScoreScorer:
    return PickScoreScorer(*_load_clip(spec.name, *_clip_pair(spec), allow_pickle, device))


def _load_clipscore(spec: ScorerSpec, allow_pickle: bool, device: str) -> ClipScorer:
    return ClipScorer(*_load_clip(spec.name, *_clip_pair(spec), allow_pickle, device))


# ---------------------------------------------------------------------------------------------
# aesthetic


def new_aesthetic_mlp(input_size: int = 768):
    """The LAION aesthetic predictor's MLP as an ``nn.Sequential``; the released state dict names the
    same modules ``layers.N.*`` (they sat under ``self.layers``), see ``AESTHETIC_LAYERS``."""
    from torch import nn

    modules: list[nn.Module] = []
    width = input_size
    for index, out in zip(AESTHETIC_LAYERS, AESTHETIC_WIDTHS):
        while len(modules) < index:  # the Dropout in front of this Linear
            modules.append(nn.Dropout(AESTHETIC_DROPOUT[len(modules)]))
        modules.append(nn.Linear(width, out))
        width = out
    return nn.Sequential(*modules)


def _aesthetic_input_width(shapes: dict[str, tuple[int, ...]], scorer: str, path: Path) -> int:
    """Check the file holds the aesthetic MLP (keys and shapes) and return its input width."""
    expected = {f"layers.{i}.{p}" for i in AESTHETIC_LAYERS for p in ("weight", "bias")}
    if set(shapes) != expected:
        missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
        raise _err(scorer, "model", f"{path} is not the LAION aesthetic MLP (missing {missing[:4]}, "
                                    f"unexpected {extra[:4]})")
    input_width = width = shapes["layers.0.weight"][1]
    for index, out in zip(AESTHETIC_LAYERS, AESTHETIC_WIDTHS):
        for key, shape in ((f"layers.{index}.weight", (out, width)), (f"layers.{index}.bias", (out,))):
            if shapes[key] != shape:
                raise _err(scorer, "model", f"{path}: {key} has shape {shapes[key]}, expected {shape}")
        width = out
    return input_width


def _clip_projection_dim(scorer: str, loc: str) -> int:
    from transformers import CLIPConfig

    try:
        return CLIPConfig.from_pretrained(loc).projection_dim
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _err(scorer, "processor", f"could not read the CLIP config of {loc!r} ({first})") from None


class AestheticScorer:
    """LAION aesthetic predictor v2: the MLP's rating of the L2-normalised CLIP image embedding."""

    name = "aesthetic"

    def __init__(self, processor, clip, mlp):
        self.processor, self.clip, self.mlp = processor, clip, mlp

    def __call__(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        import torch

        images = _batch(prompts, images)
        device = next(self.clip.parameters()).device
        scores = []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                pixels = self.processor(images=list(images[start:start + BATCH]), return_tensors="pt")["pixel_values"]
                emb = _pooled(self.clip.get_image_features(pixel_values=pixels.to(device)))  # (b, D)
                emb = emb / emb.norm(dim=-1, keepdim=True)
                scores.append(self.mlp(emb).squeeze(-1).double().cpu().numpy())
        return np.concatenate(scores)


def _check_aesthetic(spec: ScorerSpec, allow_pickle: bool) -> None:
    path = _weights_file(spec.name, "model", _required(spec), allow_pickle)
    width = _aesthetic_input_width(tensor_shapes(path, spec.name), spec.name, path)
    loc = _clip_location(spec.name, "processor", spec.resolved_processor())
    _check_clip(spec.name, loc, loc, allow_pickle)
    _check_widths(spec.name, loc, _clip_projection_dim(spec.name, loc), path, width)


def _check_widths(scorer: str, loc: str, dim: int, path: Path, width: int) -> None:
    if dim != width:
        raise _err(scorer, "processor", f"the CLIP {loc!r} gives {dim}-d embeddings but the MLP {path} reads "
                                        f"{width}-d ones (the released MLPs read CLIP ViT-L/14's 768)")


def _load_aesthetic(spec: ScorerSpec, allow_pickle: bool, device: str) -> AestheticScorer:
    path = _weights_file(spec.name, "model", _required(spec), allow_pickle)
    state = read_state_dict(path, spec.name)
    width = _aesthetic_input_width({k: tuple(v.shape) for k, v in state.items()}, spec.name, path)
    loc = _clip_location(spec.name, "processor", spec.resolved_processor())
    processor, clip = _load_clip(spec.name, loc, loc, allow_pickle, device)
    _check_widths(spec.name, loc, clip.config.projection_dim, path, width)
    mlp = new_aesthetic_mlp(width)
    mlp.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state.items()})
    return AestheticScorer(processor, clip, mlp.eval().to(device))


# ---------------------------------------------------------------------------------------------
# hpsv2


def _open_clip_architecture(scorer: str, name: str) -> tuple[str, dict]:
    """An open_clip architecture name, or a model-config .json (registered under its file stem)
    -> (name, config)."""
    import open_clip

    path = Path(name).expanduser()
    if name.endswith(".json"):
        if not path.is_file():
            raise _err(scorer, "processor", f"{path} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _err(scorer, "processor", f"{path} is not valid JSON: {err}") from None
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise _err(scorer, "processor", f"{path} is not an open_clip model config "
                                            f"(embed_dim, vision_cfg, text_cfg expected)")
        if open_clip.get_model_config(path.stem) != cfg:
            open_clip.add_model_config(path)
        return path.stem, cfg
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise _err(scorer, "processor", f"{name!r} is not an open_clip architecture (e.g. {HPS_ARCHITECTURE}) "
                                        f"nor a model-config .json file")
    return name, cfg


def _hps_expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """A few tensor shapes an open_clip CLIP of this config has (enough to tell architectures apart)."""
    text_width = cfg["text_cfg"].get("width", 512)
    return {"text_projection": (text_width, cfg["embed_dim"]),
            "visual.proj": (cfg["vision_cfg"].get("width", 768), cfg["embed_dim"]),
            "token_embedding.weight": (cfg["text_cfg"].get("vocab_size", 49408), text_width)}


def _check_hps_weights(spec: ScorerSpec, path: Path, shapes: dict, arch: str, cfg: dict) -> None:
    if "logit_scale" not in shapes or not any(k.startswith("visual.") for k in shapes):
        raise _err(spec.name, "model", f"{path} is not an open_clip CLIP checkpoint (no visual.* / logit_scale)")
    for key, shape in _hps_expected_shapes(cfg).items():
        if shapes.get(key) != shape:
            raise _err(spec.name, "model", f"{path} does not fit architecture {arch!r}: {key} has shape "
                                           f"{shapes.get(key)}, expected {shape}")


class HPSv2Scorer:
    """HPSv2: cosine of open_clip's normalised image and text embeddings, as HPSv2's ``score`` returns."""

    name = "hpsv2"

    def __init__(self, model, tokenizer, preprocess):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess

    def __call__(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        import torch
        from PIL import Image

        images = _batch(prompts, images)
        device = next(self.model.parameters()).device
        scores = []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                part = slice(start, start + BATCH)
                pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images[part]]).to(device)
                text = self.tokenizer(list(prompts[part])).to(device)
                image_emb = self.model.encode_image(pixels, normalize=True)  # (b, D)
                text_emb = self.model.encode_text(text, normalize=True)  # (b, D)
                scores.append((image_emb * text_emb).sum(-1).double().cpu().numpy())
        return np.concatenate(scores)


def _check_hpsv2(spec: ScorerSpec, allow_pickle: bool) -> None:
    path = _weights_file(spec.name, "model", _required(spec), allow_pickle)
    arch, cfg = _open_clip_architecture(spec.name, spec.resolved_processor())
    _check_hps_weights(spec, path, tensor_shapes(path, spec.name), arch, cfg)


def _load_hpsv2(spec: ScorerSpec, allow_pickle: bool, device: str) -> HPSv2Scorer:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    path = _weights_file(spec.name, "model", _required(spec), allow_pickle)
    arch, cfg = _open_clip_architecture(spec.name, spec.resolved_processor())
    state = read_state_dict(path, spec.name)
    _check_hps_weights(spec, path, {k: tuple(v.shape) for k, v in state.items()}, arch, cfg)
    model = open_clip.create_model(arch, pretrained=None)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise _err(spec.name, "model", f"{path} does not load into {arch!r}: {' '.join(first[:2])[:300]}") from None
    # HPSv2 evaluates with the longest side resized to the input size and the rest padded with black.
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode="longest",
                                           mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    return HPSv2Scorer(model.eval().to(device), open_clip.get_tokenizer(arch), preprocess)


# ---------------------------------------------------------------------------------------------
# imagereward (the model and its key mapping: hgdpo.scorers.imagereward)


def _imagereward_files(spec: ScorerSpec, allow_pickle: bool) -> tuple[Path, dict | None, str]:
    """(checkpoint, med_config.json's settings or None, tokenizer location). ``model`` is the checkpoint, or a
    folder holding ImageReward.safetensors / ImageReward.pt; ``processor`` the BERT tokenizer, by default the
    checkpoint's folder when it holds one (vocab.txt or tokenizer.json), else bert-base-uncased from the hub."""
    from hgdpo.scorers import imagereward

    path = Path(_required(spec)).expanduser()
    if path.is_dir():
        found = [path / n for n in ("ImageReward.safetensors", "ImageReward.pt") if (path / n).is_file()]
        if not found:
            raise _err(spec.name, "model", f"{path} holds neither ImageReward.safetensors nor ImageReward.pt")
        path = found[0]
    checkpoint = _weights_file(spec.name, "model", str(path), allow_pickle)
    med_config = None
    med_file = checkpoint.parent / "med_config.json"
    if med_file.is_file():
        try:
            med_config = json.loads(med_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _err(spec.name, "model", f"{med_file} is not valid JSON: {err}") from None
        if not isinstance(med_config, dict):
            raise _err(spec.name, "model", f"{med_file} is not a BERT config (a JSON object expected)")
    tokenizer = spec.resolved_processor()
    if tokenizer is None:
        beside = any((checkpoint.parent / n).is_file() for n in ("vocab.txt", "tokenizer.json"))
        tokenizer = str(checkpoint.parent) if beside else imagereward.TOKENIZER
    elif not Path(tokenizer).expanduser().exists() and not HUB_ID.match(tokenizer):
        raise _err(spec.name, "processor", f"{tokenizer} does not exist (expected a BERT tokenizer folder or a hub "
                                           f"id such as {imagereward.TOKENIZER})")
    return checkpoint, med_config, tokenizer


def _check_imagereward(spec: ScorerSpec, allow_pickle: bool) -> None:
    from hgdpo.scorers import imagereward

    checkpoint, med_config, tokenizer_loc = _imagereward_files(spec, allow_pickle)
    _, text, _ = imagereward.check_fit(tensor_shapes(checkpoint, spec.name), str(checkpoint), med_config)
    imagereward.check_vocabulary(imagereward.load_tokenizer(tokenizer_loc), text.vocab_size, tokenizer_loc,
                                 str(checkpoint))


def _load_imagereward(spec: ScorerSpec, allow_pickle: bool, device: str) -> Scorer:
    from hgdpo.scorers import imagereward

    checkpoint, med_config, tokenizer_loc = _imagereward_files(spec, allow_pickle)
    state = read_state_dict(checkpoint, spec.name)
    return imagereward.build(state, imagereward.load_tokenizer(tokenizer_loc), str(checkpoint), med_config,
                             device=device)


# ---------------------------------------------------------------------------------------------
# The interface the evaluation job uses

_CHECKS: dict[str, Callable[[ScorerSpec, bool], None]] = {
    "judge": _check_judge, "pickscore": _check_clip_scorer, "clip": _check_clip_scorer,
    "aesthetic": _check_aesthetic, "hpsv2": _check_hpsv2, "imagereward": _check_imagereward,
}
_LOADERS: dict[str, Callable[[ScorerSpec, bool, str], Scorer]] = {
    "judge": _load_judge, "pickscore": _load_pickscore, "clip": _load_clipscore,
    "aesthetic": _load_aesthetic, "hpsv2": _load_hpsv2, "imagereward": _load_imagereward,
}


def _known(spec: ScorerSpec) -> None:
    if spec.name not in SCORER_NAMES:
        raise HgdpoError(f"scorer {spec.name!r}, name: unknown scorer; known: {', '.join(SCORER_NAMES)}")


def check_scorer(spec: ScorerSpec, *, allow_pickle: bool = False) -> None:
    """Fast check before any work: the name is known, the paths exist and look like that scorer,
    a pickle file is refused unless ``allow_pickle``, a checkpoint's keys and shapes fit its scorer. Raises
    ``HgdpoError`` naming the scorer and the field/file. Loads configs and headers, not weights."""
    _known(spec)
    _CHECKS[spec.name](spec, allow_pickle)


def check_prompts(spec: ScorerSpec, prompts: list[str]) -> None:
    """For ``judge``: every prompt must be a caption of the miniature world's grammar (the judge reads
    nothing else); raises ``HgdpoError`` naming the first that is not. A no-op for other scorers."""
    if spec.name != "judge":
        return
    from hgdpo.world.scene import parse_caption

    for i, prompt in enumerate(prompts):
        try:
            parse_caption(prompt)
        except ValueError:
            raise HgdpoError(f"scorer 'judge': prompt {i + 1} ({prompt!r}) is not a caption of the miniature "
                             f"world's grammar, the only prompts the judge can read; drop `judge` from the "
                             f"scorers for other prompts") from None


def load_scorer(spec: ScorerSpec, *, allow_pickle: bool = False, device: str = "cpu") -> Scorer:
    """Load a scorer on ``device``: ``scorer(prompts, images)`` -> (B,) float64, higher = better."""
    _known(spec)
    return _LOADERS[spec.name](spec, allow_pickle, device)
