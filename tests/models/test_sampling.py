"""Generation at bounded memory and exact scoring: chunked sampler runs and VAE decodes, float32
PickScore, the inference settings and their CPU fallbacks (embedded default model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hgdpo.models import loading as models
from hgdpo.models.sampling import decode, generate, image_seeds, sample_latents, set_sampler, setup_inference
from hgdpo.scorers.base import rank
from hgdpo.scorers.pickscore import pickscore, preference_scores

PROMPT = "a large red circle on the left"
KW = dict(steps=4, guidance_scale=5.0, width=64, height=64)


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = models.load_pipeline("embedded")
    set_sampler(p, "dpm_multistep")
    yield p
    torch.set_num_threads(threads)


def test_a_chunked_vae_decode_gives_the_images_of_one_batch(pipe):
    """Tolerance: batched convolutions round differently; a pixel may move by one level of 255,
    and fewer than 0.5% of the values do."""
    latents = sample_latents(pipe, PROMPT, image_seeds(0, "p", 6), **KW)
    whole = decode(pipe, latents)
    for batch in (1, 4):
        chunked = decode(pipe, latents, batch=batch)
        assert chunked.shape == whole.shape == (6, 64, 64, 3) and chunked.dtype == np.uint8
        diff = np.abs(chunked.astype(int) - whole.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 5e-3, (batch, diff.max(), (diff > 0).mean())


def test_chunked_sampler_runs_give_the_latents_of_one_run(pipe):
    """Each image's noise comes from its own seed, so an image does not depend on the chunking beyond
    float rounding (float16 storage: one ulp)."""
    seeds = image_seeds(0, "q", 5)
    whole = sample_latents(pipe, PROMPT, seeds, **KW).to(torch.float16)
    for batch in (1, 2):
        chunked = sample_latents(pipe, PROMPT, seeds, batch=batch, **KW).to(torch.float16)
        torch.testing.assert_close(chunked, whole, rtol=2e-3, atol=2e-3)
    alone = sample_latents(pipe, PROMPT, seeds[3:4], **KW).to(torch.float16)  # any image regenerates alone
    torch.testing.assert_close(alone[0], whole[3], rtol=2e-3, atol=2e-3)


def test_float32_scoring_separates_what_float16_ties():
    """Two image embeddings whose cosines with the text differ by 1.5e-4: at logit scale 100 the scores
    are 99.995 and 99.980, both 100.0 in float16 (its spacing there is 1/16)."""
    text = torch.tensor([[1.0, 0.0]], dtype=torch.float16)
    images = torch.tensor([[1.0, 0.02], [1.0, 0.01]], dtype=torch.float16)
    logit_scale = torch.tensor(np.log(100.0), dtype=torch.float16)
    # The same arithmetic in float16 ties (the constructed case is real) ...
    t, i = text / text.norm(dim=-1, keepdim=True), images / images.norm(dim=-1, keepdim=True)
    half = (logit_scale.exp() * (i @ t.T)).squeeze(-1)
    assert half.dtype == torch.float16 and half[0] == half[1]
    # ... float32 separates them: image 1 (closer to the text) wins, not the lower index.
    scores = preference_scores(text, images, logit_scale)
    assert scores.dtype == torch.float32 and scores[1] > scores[0]
    assert rank(scores.numpy()).tolist() == [1, 0]
    scale = np.exp(float(logit_scale))  # 100.03: the scale itself is stored in float16
    cosines = [1 / np.sqrt(1 + float(images[0, 1]) ** 2), 1 / np.sqrt(1 + float(images[1, 1]) ** 2)]
    np.testing.assert_allclose(scores.numpy(), scale * np.asarray(cosines), rtol=1e-6)


def test_pickscore_in_chunks_equals_one_call(pipe):
    processor, scorer = models.load_scorer("embedded")
    _, images = generate(pipe, PROMPT, image_seeds(1, "r", 5), **KW)
    whole = pickscore(processor, scorer, PROMPT, images)
    np.testing.assert_allclose(pickscore(processor, scorer, PROMPT, images, batch=2), whole, rtol=1e-5)
    assert whole.dtype == np.float32 and whole.shape == (5,)


def test_inference_settings_and_their_cpu_fallbacks(pipe, capsys):
    """On CPU: eager attention gives SDPA's images to rounding; channels-last is left alone; compile
    warns and runs uncompiled."""
    seeds = image_seeds(2, "s", 2)
    sdpa, _ = generate(pipe, PROMPT, seeds, **KW)
    warnings = []
    applied = setup_inference(pipe, attention="eager", channels_last=True, compile_unet=True, log=warnings.append)
    try:
        assert applied == ["attention eager"]
        assert warnings and "running the UNet uncompiled" in warnings[0]
        assert not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
        eager, _ = generate(pipe, PROMPT, seeds, **KW)
        np.testing.assert_allclose(eager.astype(np.float32), sdpa.astype(np.float32), rtol=5e-3, atol=5e-3)
    finally:
        assert setup_inference(pipe, attention="sdpa", channels_last=False) == ["attention sdpa"]
