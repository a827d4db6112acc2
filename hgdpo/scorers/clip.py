"""CLIP score: ``100 * max(cos(text embedding, image embedding), 0)`` of a CLIP model.

``model``: a CLIP folder or hub id (``embedded``: the world's CLIP; real: openai/clip-vit-large-patch14);
the processor is the model's own.
"""

from __future__ import annotations

import numpy as np

from hgdpo.scorers.base import Setting, pooled
from hgdpo.scorers.clipmodel import ClipModelScorer


class ClipScorer(ClipModelScorer):
    """CLIP score of (prompt, image) pairs; the cosine is taken in float32 whatever the model's dtype."""

    name = "clip"
    model_setting = Setting("clip_model",
                            "CLIP-score model: `embedded`, a hub id (openai/clip-vit-large-patch14) or a folder.")

    def __init__(self, processor, model):
        super().__init__(processor, model)
        self.max_length = model.config.text_config.max_position_embeddings

    def score_batch(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        import torch  # heavy: not loaded when configs are checked

        device, dtype = next(self.model.parameters()).device, next(self.model.parameters()).dtype
        with torch.no_grad():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            text = self.processor(text=list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt")
            image_emb = pooled(self.model.get_image_features(pixel_values=pixels.to(device, dtype)))  # (b, D)
            text_emb = pooled(self.model.get_text_features(input_ids=text["input_ids"].to(device),
                                                           attention_mask=text["attention_mask"].to(device)))
            cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)  # (b,)
            return 100 * cos.clamp(min=0).double().cpu().numpy()
