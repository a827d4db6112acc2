"""OSPO for a diffusion model: object-centric pairs judged by the model itself, and their object masks.

OSPO (Object-Centric Self-Improving Preference Optimization) builds its own preference data: hard
negatives from *perturbed* prompts (``hgdpo.pool.perturb``), judged by the model being trained, then
trained with attention-based object masks. Its public code is an autoregressive image model that
answers per-object yes/no questions about its own images; an SD model answers no questions, so
"self" is read here as the diffusion model's own likelihood of a prompt given an image:

**The self-judge (a diffusion classifier).** The denoising error of image ``x`` under text ``c``,

    err(x, c) = mean over draws d of  mean((eps_d - eps_theta(x_{t_d}, t_d, c))^2),

estimates (up to constants) how unlikely ``x`` is under ``c``: the variational bound of a diffusion
model is a weighted sum of such errors. A *question* is a perturbation ``c'`` of the prompt ``c``
(one changed colour, shape, size, position or relation, a swap, a dropped object): the image answers
"yes, it shows c rather than c'" with margin

    margin(x, c') = err(x, c') - err(x, c)          (> 0: the image fits c better than c'),

the analogue of OSPO's ``p_yes - p_no``. An image's self-score is the mean margin over the prompt's
questions; it *passes* when every margin exceeds ``margin`` (OSPO: "answers every question yes with
margin") and *fails* when some margin is below 0 (OSPO: "fails at least one"). The draws (timestep,
noise) are the same for every image and every text of a prompt (common random numbers), so margins
compare like with like: the difference of two errors on the same noise has far less variance than
either error. The UNet is the base model's, the pool's own: no external judge.

**Pairs.** The pool generates, for each of the N seeds of a prompt, the original prompt's image and
the first question's (the *hard negative*) from the same seed, so image j and its negative j differ
mainly in what the perturbation changed. The pair of a prompt is the seed ``j < n`` whose original
passes and whose negative fails, with the largest score gap; both images are then trained under the
*original* prompt (OSPO's rule). A prompt with no such seed is refused (no pair): that is the
self-judge's filter, and the pair dataset records how many prompts it kept.

**Masks.** ``object_weight`` in ``hgdpo.objectives.masks`` (OSPO's recipe) on the reference UNet's
cross-attention maps at training time (``hgdpo.models.attention.capture``), from each noun's tokens:
``noun_tokens`` finds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from hgdpo.pool import perturb as perturb_
from hgdpo.pool.phrases import word_spans
from hgdpo.prompts import stable_hash

SELF_TIMESTEPS = (200, 400, 600, 800)  # mid-range noise levels, where a diffusion classifier separates texts best


def questions(prompt: str, kinds: Sequence[str], seed: int, count: int) -> list[str]:
    """Up to ``count`` distinct perturbations of ``prompt`` (kinds drawn uniformly among those of
    ``kinds`` that apply), deterministic in (seed, prompt). The first makes the hard negatives. Empty
    when no kind applies."""
    usable = [k for k in perturb_.applicable_kinds(prompt) if k in kinds]
    out: list[str] = []
    if not usable:
        return out
    rng = np.random.default_rng(stable_hash(f"hgdpo-ospo:{int(seed)}:{prompt}"))
    for _ in range(8 * count):  # a few more tries than needed: draws can repeat a text
        text = perturb_.perturb(prompt, usable[rng.integers(len(usable))], rng).perturbed
        if text != prompt and text not in out:
            out.append(text)
            if len(out) == count:
                break
    return out


def _draws(seed: int, prompt_id: str, shape: tuple[int, ...], timesteps: Sequence[int]) -> torch.Tensor:
    digest = hashlib.sha256(f"hgdpo-self-judge:{seed}:{prompt_id}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn((len(timesteps), *shape), generator=gen)  # (T, C, h, w)


@torch.no_grad()
def denoising_errors(unet, scheduler, latents: torch.Tensor, texts: torch.Tensor, noise: torch.Tensor,
                     timesteps: Sequence[int], batch: int = 16) -> torch.Tensor:
    """``err(x, c)`` for every image and text: (M, K).

    Args:
        unet: the model's UNet (eps-prediction); scheduler: its training noise schedule (``add_noise``).
        latents: (M, C, h, w) the images' scaled latents.
        texts: (K, L, D) text-encoder hidden states.
        noise: (T, C, h, w) one noise per draw; ``timesteps``: the T draws' timesteps.
        batch: UNet inputs per call.
    """
    device, dtype = unet.device, unet.dtype
    m, k = len(latents), len(texts)
    out = torch.zeros(m, k)
    for d, step in enumerate(timesteps):
        t = torch.full((m,), int(step), dtype=torch.long)
        eps = noise[d].expand(m, -1, -1, -1)  # (M, C, h, w)
        noisy = scheduler.add_noise(latents.float().cpu(), eps, t)
        # Every (image, text) input of this draw, ``batch`` at a time: rows i * K + j.
        pairs = [(i, j) for i in range(m) for j in range(k)]
        for start in range(0, len(pairs), batch):
            part = pairs[start: start + batch]
            x = torch.stack([noisy[i] for i, _ in part]).to(device, dtype)
            c = torch.stack([texts[j] for _, j in part]).to(device, dtype)
            step_t = torch.full((len(part),), int(step), dtype=torch.long, device=device)
            pred = unet(x, step_t, encoder_hidden_states=c).sample.float().cpu()
            err = ((pred - noise[d]) ** 2).flatten(1).mean(1)
            for (i, j), e in zip(part, err):
                out[i, j] += e / len(timesteps)
    return out


def margins(errors: torch.Tensor) -> torch.Tensor:
    """(M, K) errors, text 0 the original -> (M, K-1) margins ``err(x, c'_k) - err(x, c)``."""
    return errors[:, 1:] - errors[:, :1]


def self_judge(pipe, scheduler, prompt_id: str, prompt: str, alternatives: Sequence[str], latents: np.ndarray,
               seed: int, timesteps: Sequence[int] = SELF_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
    """Self-scores (mean margin) and least margins of ``latents`` (M, C, h, w) for ``prompt`` against its
    ``alternatives`` (the questions): two float32 arrays of M. NaN when there is no question."""
    if not alternatives:
        nan = np.full(len(latents), np.nan, np.float32)
        return nan, nan.copy()
    texts = torch.cat([pipe.encode_prompt(t, pipe.unet.device, 1, False)[0] for t in [prompt, *alternatives]])
    noise = _draws(seed, prompt_id, tuple(latents.shape[1:]), timesteps)
    mg = margins(denoising_errors(pipe.unet, scheduler, torch.from_numpy(np.asarray(latents, np.float32)), texts,
                                  noise, timesteps))
    return mg.mean(1).numpy().astype(np.float32), mg.min(1).values.numpy().astype(np.float32)


def choose_pair(self_scores: Sequence[float], self_least: Sequence[float], n: int, margin: float) -> int | None:
    """The seed ``j < n`` of a prompt's OSPO pair, or None (refused).

    ``self_scores`` / ``self_least``: 2N values, the N originals then their N negatives (same seeds).
    Among the seeds whose original passes (least margin > ``margin``) and whose negative fails (least
    margin < 0), the one with the largest score gap (ties: the lower seed)."""
    scores, least = np.asarray(self_scores, np.float64), np.asarray(self_least, np.float64)
    big_n = len(scores) // 2
    best, gap = None, -np.inf
    for j in range(n):
        if least[j] > margin and least[big_n + j] < 0 and scores[j] - scores[big_n + j] > gap:
            best, gap = j, scores[j] - scores[big_n + j]
    return best


def noun_tokens(tokenizer, prompt: str) -> list[list[int]]:
    """Per noun phrase of ``prompt`` (``hgdpo.pool.perturb``: the grammar's objects, or the free-text rules),
    the text-token indices of its noun (start token = 0), as the UNet sees them (truncated at the
    tokenizer's maximum length: a noun past it has no tokens and is left out).

    CLIP's tokenizer splits the text into words before BPE, so the tokens of a word are those that
    tokenizing the text up to its end adds to tokenizing the text up to its start."""
    words = word_spans(prompt)
    limit = tokenizer.model_max_length - 1  # the end token takes the last place

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    out = []
    for phrase in perturb_.objects(prompt):
        _, start, end = words[phrase.noun]
        first, last = 1 + count(prompt[:start]), 1 + count(prompt[:end])
        tokens = [i for i in range(first, last) if i < limit]
        if tokens:
            out.append(tokens)
    return out


def encode_nouns(groups: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Noun token groups as one (length,) array: token i holds k + 1 when it belongs to noun k, else 0
    (how a pair record carries them)."""
    ids = np.zeros(length, np.float16)
    for k, group in enumerate(groups):
        ids[list(group)] = k + 1
    return ids


def decode_nouns(ids: np.ndarray) -> list[list[int]]:
    """The inverse of ``encode_nouns``."""
    ids = np.asarray(ids).astype(np.int64)
    return [np.flatnonzero(ids == k).tolist() for k in range(1, int(ids.max(initial=0)) + 1)
            if (ids == k).any()]
