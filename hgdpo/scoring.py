"""PickScore: the AI feedback that ranks a prompt's N images (paper §3.1, eq. 5).

``score = logit_scale.exp() * cos(text_embedding, image_embedding)``; a softmax over a
prompt's images turns these into preference probabilities, but ranking needs only the scores.
"""

from __future__ import annotations

import numpy as np
import torch


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose projected embedding is `.pooler_output`;
    # older versions returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def pickscore(processor, model, prompt: str, images: np.ndarray) -> np.ndarray:
    """Scores (N,) float32 of uint8 ``images`` (N, H, W, 3) for one ``prompt``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixels = processor(images=[np.array(im) for im in images], return_tensors="pt")["pixel_values"].to(device, dtype)
    text = processor(text=[prompt], padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    text_emb = _features(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                 attention_mask=text["attention_mask"].to(device)))
    image_emb = _features(model.get_image_features(pixel_values=pixels))
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)  # (1, D)
    image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)  # (N, D)
    scores = model.logit_scale.exp() * (image_emb @ text_emb.T).squeeze(-1)
    return scores.float().cpu().numpy()


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices of ``scores`` best first (ties keep seed order, so ranking is deterministic)."""
    return np.argsort(-np.asarray(scores), kind="stable").astype(np.int32)
