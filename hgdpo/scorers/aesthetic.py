"""LAION aesthetic predictor v2: the rating (AVA's 1-10 scale) its MLP (``hgdpo.scorers.heads``) gives the
L2-normalised CLIP image embedding; the prompt is not read.

``model``: the MLP's weights, required (sac+logos+ava1-l14-linearMSE.pth, or a .safetensors of them);
``processor``: the CLIP it reads embeddings of (openai/clip-vit-large-patch14), a folder or a hub id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hgdpo.scorers import heads
from hgdpo.scorers.base import Scorer, ScorerSpec, Setting, pooled
from hgdpo.scorers.clipmodel import check_clip, clip_location, load_clip
from hgdpo.scorers.weights import read_state_dict, tensor_shapes, weights_file

CLIP_L14 = "openai/clip-vit-large-patch14"


class AestheticScorer(Scorer):
    """The aesthetic MLP on a CLIP's normalised image embeddings (taken in float32)."""

    name = "aesthetic"
    default_processor = CLIP_L14
    required_model = "the LAION aesthetic MLP weights (sac+logos+ava1-l14-linearMSE.pth, or a .safetensors of them)"
    model_setting = Setting("aesthetic_model", "LAION aesthetic MLP weights (.safetensors; .pth with allow_pickle).")
    processor_setting = Setting("aesthetic_clip", "The CLIP ViT-L/14 the aesthetic MLP reads embeddings of: hub id "
                                                  "or folder.")

    def __init__(self, processor, clip, mlp):
        self.processor, self.clip, self.mlp = processor, clip, mlp

    @classmethod
    def input_width(cls, shapes: dict[str, tuple[int, ...]], path: Path) -> int:
        """Check the file holds the aesthetic MLP (keys and shapes) and return its input width."""
        expected = set(heads.head_shapes(1, "layers."))
        if set(shapes) != expected:
            missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
            raise cls.error("model", f"{path} is not the LAION aesthetic MLP (missing {missing[:4]}, "
                                     f"unexpected {extra[:4]})")
        width = shapes["layers.0.weight"][1]
        for key, shape in heads.head_shapes(width, "layers.").items():
            if shapes[key] != shape:
                raise cls.error("model", f"{path}: {key} has shape {shapes[key]}, expected {shape}")
        return width

    @classmethod
    def check_widths(cls, loc: str, dim: int, path: Path, width: int) -> None:
        if dim != width:
            raise cls.error("processor", f"the CLIP {loc!r} gives {dim}-d embeddings but the MLP {path} reads "
                                         f"{width}-d ones (the released MLPs read CLIP ViT-L/14's 768)")

    @classmethod
    def projection_dim(cls, loc: str) -> int:
        from transformers import CLIPConfig  # heavy: not loaded when configs are checked

        try:
            return CLIPConfig.from_pretrained(loc).projection_dim
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise cls.error("processor", f"could not read the CLIP config of {loc!r} ({first})") from None

    @classmethod
    def check(cls, spec: ScorerSpec, allow_pickle: bool = False) -> None:
        path = weights_file(cls.name, "model", cls.required(spec), allow_pickle)
        width = cls.input_width(tensor_shapes(path, cls.name), path)
        loc = clip_location(cls.name, "processor", cls.processor_of(spec))
        check_clip(cls.name, loc, loc, allow_pickle)
        cls.check_widths(loc, cls.projection_dim(loc), path, width)

    @classmethod
    def load(cls, spec: ScorerSpec, *, allow_pickle: bool = False, device: str = "cpu", dtype=None,
             attention: str | None = None) -> AestheticScorer:
        path = weights_file(cls.name, "model", cls.required(spec), allow_pickle)
        state = read_state_dict(path, cls.name)
        width = cls.input_width({k: tuple(v.shape) for k, v in state.items()}, path)
        loc = clip_location(cls.name, "processor", cls.processor_of(spec))
        processor, clip = load_clip(cls.name, loc, loc, allow_pickle, device, dtype, attention)
        cls.check_widths(loc, clip.config.projection_dim, path, width)
        mlp = heads.new_head(width)
        mlp.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state.items()})
        return cls(processor, clip, mlp.eval().to(device))

    def score_batch(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        import torch  # heavy: not loaded when configs are checked

        device, dtype = next(self.clip.parameters()).device, next(self.clip.parameters()).dtype
        with torch.no_grad():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            emb = pooled(self.clip.get_image_features(pixel_values=pixels.to(device, dtype))).float()  # (b, D)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return self.mlp(emb).squeeze(-1).double().cpu().numpy()
