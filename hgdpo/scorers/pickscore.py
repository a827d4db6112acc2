"""PickScore: the AI feedback that ranks a prompt's N images (paper §3.1, eq. 5), and a scorer of the
evaluation.

``score = logit_scale.exp() * cos(text_embedding, image_embedding)``; a softmax over a
prompt's images turns these into preference probabilities, but ranking needs only the scores.

The model may run in float16 on a GPU; the embeddings' normalisation and the score are always
taken in float32. In float16 scores near 21 are quantised to 1/64 (and near 100 to 1/16), so two
close images would tie and the tie would go to the lower index, skewing the winner/loser choice
and the loser-rank ablation.

``model``: a CLIP folder or hub id (``embedded``: the world's PickScore; real: yuvalkirstain/PickScore_v1);
``processor``: a processor folder or hub id (the model's own; real: laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hgdpo.scorers.base import Setting, pooled
from hgdpo.scorers.clipmodel import ClipModelScorer

if TYPE_CHECKING:
    import torch


def preference_scores(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Eq. 5 in float32 whatever the inputs' dtype: ``text_emb`` (1, D), ``image_emb`` (N, D) -> (N,)."""
    text = text_emb.float()
    image = image_emb.float()
    text = text / text.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    return logit_scale.float().exp() * (image @ text.T).squeeze(-1)


def text_embedding(processor, model, prompt: str) -> torch.Tensor:
    """The prompt's projected CLIP text embedding (1, D), in the model's dtype."""
    import torch  # heavy: not loaded when configs are checked

    device = next(model.parameters()).device
    text = processor(text=[prompt], padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        return pooled(model.get_text_features(input_ids=text["input_ids"].to(device),
                                              attention_mask=text["attention_mask"].to(device)))


def pickscore(processor, model, prompt: str, images: np.ndarray, *, batch: int | None = None,
              text_emb: torch.Tensor | None = None) -> np.ndarray:
    """Scores (N,) float32 of uint8 ``images`` (N, H, W, 3) for one ``prompt``.

    ``batch``: images per CLIP call (None: all at once); preprocessing (resize to the processor's
    224 px) is per call too, so memory does not grow with N. ``text_emb``: the prompt's embedding
    when the caller has it already.
    """
    import torch  # heavy: not loaded when configs are checked

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if text_emb is None:
        text_emb = text_embedding(processor, model, prompt)
    step = batch or len(images)
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), step):
            chunk = [np.asarray(im) for im in images[start: start + step]]
            pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(device, dtype)
            image_emb = pooled(model.get_image_features(pixel_values=pixels))
            scores.append(preference_scores(text_emb, image_emb, model.logit_scale).cpu())
    return torch.cat(scores).numpy().astype(np.float32)


class PickScoreScorer(ClipModelScorer):
    """PickScore (``pickscore``), one prompt's images at a time: the prompt is encoded once per batch."""

    name = "pickscore"
    per_prompt = True
    model_setting = Setting("pickscore_model",
                            "PickScore model: `embedded`, a hub id (yuvalkirstain/PickScore_v1) or a folder.")
    processor_setting = Setting("pickscore_processor", "PickScore processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K); "
                                                       "default: the model's.")

    def score_batch(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        return pickscore(self.processor, self.model, prompts[0], images)
