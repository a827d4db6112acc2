"""HPSv2: the cosine of open_clip's normalised image and text embeddings (what HPSv2's own ``score``
returns, not x100).

``model``: the HPSv2 checkpoint, required (HPS_v2_compressed.pt, HPS_v2.1_compressed.pt, or a .safetensors
of its state_dict); ``processor``: its open_clip architecture name or a model-config .json (ViT-H-14).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from hgdpo.scorers.base import Scorer, ScorerSpec, Setting
from hgdpo.scorers.weights import read_state_dict, tensor_shapes, weights_file

ARCHITECTURE = "ViT-H-14"


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """A few tensor shapes an open_clip CLIP of this config has (enough to tell architectures apart)."""
    text_width = cfg["text_cfg"].get("width", 512)
    return {"text_projection": (text_width, cfg["embed_dim"]),
            "visual.proj": (cfg["vision_cfg"].get("width", 768), cfg["embed_dim"]),
            "token_embedding.weight": (cfg["text_cfg"].get("vocab_size", 49408), text_width)}


class HPSv2Scorer(Scorer):
    """HPSv2 on open_clip (float32)."""

    name = "hpsv2"
    default_processor = ARCHITECTURE
    required_model = ("the HPSv2 checkpoint (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt, or a .safetensors of its "
                      "state_dict)")
    model_setting = Setting("hpsv2_model", "HPSv2 checkpoint (HPS_v2_compressed.pt needs allow_pickle; or "
                                           ".safetensors).")
    processor_setting = Setting("hpsv2_architecture", "open_clip architecture of the HPSv2 checkpoint.", path=False)

    def __init__(self, model, tokenizer, preprocess):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess

    @classmethod
    def architecture(cls, name: str) -> tuple[str, dict]:
        """An open_clip architecture name, or a model-config .json (registered under its file stem)
        -> (name, config)."""
        import open_clip  # optional and heavy: only HPSv2 needs it

        path = Path(name).expanduser()
        if name.endswith(".json"):
            if not path.is_file():
                raise cls.error("processor", f"{path} does not exist")
            try:
                cfg = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise cls.error("processor", f"{path} is not valid JSON: {err}") from None
            if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                raise cls.error("processor", f"{path} is not an open_clip model config "
                                             f"(embed_dim, vision_cfg, text_cfg expected)")
            if open_clip.get_model_config(path.stem) != cfg:
                open_clip.add_model_config(path)
            return path.stem, cfg
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise cls.error("processor", f"{name!r} is not an open_clip architecture (e.g. {ARCHITECTURE}) "
                                         f"nor a model-config .json file")
        return name, cfg

    @classmethod
    def check_weights(cls, path: Path, shapes: dict, arch: str, cfg: dict) -> None:
        if "logit_scale" not in shapes or not any(k.startswith("visual.") for k in shapes):
            raise cls.error("model", f"{path} is not an open_clip CLIP checkpoint (no visual.* / logit_scale)")
        for key, shape in _expected_shapes(cfg).items():
            if shapes.get(key) != shape:
                raise cls.error("model", f"{path} does not fit architecture {arch!r}: {key} has shape "
                                         f"{shapes.get(key)}, expected {shape}")

    @classmethod
    def check(cls, spec: ScorerSpec, allow_pickle: bool = False) -> None:
        path = weights_file(cls.name, "model", cls.required(spec), allow_pickle)
        arch, cfg = cls.architecture(cls.processor_of(spec))
        cls.check_weights(path, tensor_shapes(path, cls.name), arch, cfg)

    @classmethod
    def load(cls, spec: ScorerSpec, *, allow_pickle: bool = False, device: str = "cpu", dtype=None,
             attention: str | None = None) -> HPSv2Scorer:
        import open_clip  # optional and heavy: only HPSv2 needs it
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        path = weights_file(cls.name, "model", cls.required(spec), allow_pickle)
        arch, cfg = cls.architecture(cls.processor_of(spec))
        state = read_state_dict(path, cls.name)
        cls.check_weights(path, {k: tuple(v.shape) for k, v in state.items()}, arch, cfg)
        model = open_clip.create_model(arch, pretrained=None)
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise cls.error("model", f"{path} does not load into {arch!r}: {' '.join(first[:2])[:300]}") from None
        # HPSv2 evaluates with the longest side resized to the input size and the rest padded with black.
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode="longest",
                                               mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
        return cls(model.eval().to(device), open_clip.get_tokenizer(arch), preprocess)

    def score_batch(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        import torch  # heavy: not loaded when configs are checked

        device = next(self.model.parameters()).device
        with torch.no_grad():
            pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images]).to(device)
            text = self.tokenizer(list(prompts)).to(device)
            image_emb = self.model.encode_image(pixels, normalize=True)  # (b, D)
            text_emb = self.model.encode_text(text, normalize=True)  # (b, D)
            return (image_emb * text_emb).sum(-1).double().cpu().numpy()
