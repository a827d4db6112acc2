"""OSPO for diffusion (hgdpo.pool.ospo): the questions, the self-judge on the tailored model, the pair rule, the
noun tokens and the mask weights; a pool with hard negatives; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hgdpo.errors import ConfigError
from hgdpo.objectives import masks
from hgdpo.pool import ospo


def test_questions_are_distinct_perturbations_fixed_by_seed_and_prompt():
    prompt = "a red circle left of a blue square"
    qs = ospo.questions(prompt, ("replace", "swap", "drop"), seed=0, count=3)
    assert len(qs) == 3 and len(set(qs)) == 3 and prompt not in qs
    assert qs == ospo.questions(prompt, ("replace", "swap", "drop"), seed=0, count=3)
    assert ospo.questions(prompt, ("drop",), 0, 2) in (["a red circle"], ["a blue square"], ["a red circle",
                                                                                          "a blue square"],
                                                       ["a blue square", "a red circle"])
    assert ospo.questions("a red circle", ("swap", "drop"), 0, 2) == []  # one object: nothing to swap or drop


def test_choose_pair_takes_the_seed_whose_original_passes_and_negative_fails_by_the_widest_gap():
    # N = 3: scores / least margins of originals 0..2, then negatives 0..2 (same seeds).
    scores = [0.5, 0.9, 0.8, 0.1, 0.2, -0.3]
    least = [0.1, 0.2, 0.3, -0.1, 0.05, -0.2]
    # seed 0: passes, negative fails, gap 0.4; seed 1: negative does not fail; seed 2: gap 0.8 + ... = 1.1
    assert ospo.choose_pair(scores, least, n=3, margin=0.0) == 2
    assert ospo.choose_pair(scores, least, n=2, margin=0.0) == 0  # seed 2 is beyond n
    assert ospo.choose_pair(scores, least, n=3, margin=0.25) == 2  # only seed 2 passes by 0.25
    assert ospo.choose_pair(scores, least, n=2, margin=0.25) is None  # refused: no seed qualifies
    nan = [float("nan")] * 6  # a prompt without questions
    assert ospo.choose_pair(nan, nan, n=3, margin=0.0) is None
    tie = ospo.choose_pair([1, 1, 0, 0], [1, 1, -1, -1], n=2, margin=0.0)
    assert tie == 0  # equal gaps: the lower seed


def test_margins_are_differences_to_the_original_texts_error():
    errors = torch.tensor([[1.0, 1.5, 0.5], [2.0, 2.0, 3.0]])
    assert torch.equal(ospo.margins(errors), torch.tensor([[0.5, -0.5], [0.0, 1.0]]))


@pytest.fixture(scope="module")
def pipe():
    from hgdpo.models import loading as models
    from hgdpo.models.sampling import set_sampler

    p = models.load_pipeline("embedded", dtype=torch.float32, device="cpu")
    set_sampler(p, "dpm_multistep")
    return p


def test_denoising_errors_are_the_mean_squared_error_of_each_image_under_each_text(pipe):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = torch.cat([pipe.encode_prompt(t, "cpu", 1, False)[0] for t in ("a red circle", "a blue square")])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    errors = ospo.denoising_errors(pipe.unet, sched, latents, texts, noise, (300, 700), batch=4)
    assert errors.shape == (3, 2)
    # By hand: image 1 under text 1, the mean over the two draws of the mean squared error.
    direct = 0.0
    for d, step in enumerate((300, 700)):
        t = torch.tensor([step])
        x = sched.add_noise(latents[1:2], noise[d: d + 1], t)
        with torch.no_grad():
            pred = pipe.unet(x, t, encoder_hidden_states=texts[1:2]).sample
        direct += ((pred - noise[d]) ** 2).mean().item() / 2
    assert errors[1, 1].item() == pytest.approx(direct, rel=1e-5)
    # The batch split does not change the numbers.
    torch.testing.assert_close(ospo.denoising_errors(pipe.unet, sched, latents, texts, noise, (300, 700), batch=1),
                               errors, rtol=1e-5, atol=1e-7)


def test_the_self_judge_prefers_images_of_the_prompt_to_their_hard_negatives(pipe):
    """The tailored model knows the world's colours: judging its own images against the prompts' perturbations,
    the originals score above the negatives from the same seeds on most prompts."""
    from diffusers import DDPMScheduler

    from hgdpo.models.sampling import image_seeds, sample_latents

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = ["a blue square on the right", "a green square in the center",
               "a purple circle, a red triangle and a blue triangle", "a green triangle left of a blue square"]
    gaps = []
    for i, prompt in enumerate(prompts):
        qs = ospo.questions(prompt, ("replace", "swap", "drop"), 0, 2)
        seeds = image_seeds(0, f"p{i}", 2)
        lat = [sample_latents(pipe, text, seeds, steps=6, guidance_scale=5.0, width=64, height=64)
               for text in (prompt, qs[0])]
        scores, least = ospo.self_judge(pipe, sched, f"p{i}", prompt, qs, torch.cat(lat).numpy(), seed=0)
        assert scores.shape == least.shape == (4,) and (least <= scores + 1e-7).all()  # the least is at most the mean
        gaps.append(scores[:2].mean() - scores[2:].mean())
    assert sum(g > 0 for g in gaps) >= 3, gaps
    assert ospo.self_judge(pipe, sched, "x", "a red circle", [], np.zeros((2, 4, 16, 16), np.float32), 0)[0].shape == (2,)


def test_noun_tokens_are_the_nouns_sub_tokens_as_the_unet_sees_them(pipe):
    tok = pipe.tokenizer
    for prompt, nouns in (("a red circle left of a blue square", ["circle", "square"]),
                          ("a photo of two cats and a xylophone", ["cats", "xylophone"]),
                          ("a small yellow triangle, a black square and a blue circle", ["triangle", "square",
                                                                                         "circle"])):
        groups = ospo.noun_tokens(tok, prompt)
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert [tok.decode([ids[i] for i in g]).strip() for g in groups] == nouns, (prompt, groups)
    assert len(ospo.noun_tokens(tok, "a xylophone")[0]) > 1  # a word of several BPE tokens keeps them all
    long = " ".join(["a red circle"] * 30)  # the nouns past the 77th token are cut, as the UNet cuts them
    assert all(i < 76 for g in ospo.noun_tokens(tok, long) for i in g) and len(ospo.noun_tokens(tok, long)) < 30
    groups = [[2], [5, 6]]
    ids = ospo.encode_nouns(groups, 77)
    assert ids.shape == (77,) and ospo.decode_nouns(ids) == groups and ospo.decode_nouns(np.zeros(77)) == []


def test_mask_weights_rise_on_the_nouns_attended_positions_and_stay_one_without_nouns():
    maps = torch.full((2, 77, 8, 8), 0.01)
    maps[:, 2, 1:4, 1:4] = 0.9  # noun token 2 attends to a 3x3 square
    native = masks.mask_weights(maps, [[[2]], []], (8, 8), alpha=1.0, gamma_m=1.0)
    assert native[0].max() == pytest.approx(2.0) and native[0].min() == pytest.approx(1.0)  # 1 + alpha * [0, 1]
    assert native[0, 0, 2, 2] == pytest.approx(2.0) and native[0, 0, 7, 7] == pytest.approx(1.0)
    w = masks.mask_weights(maps, [[[2]], []], (16, 16), alpha=1.0, gamma_m=1.0)  # resized to the latent
    assert w.shape == (2, 1, 16, 16) and 1.0 <= w.min() and w.max() <= 2.0
    assert torch.equal(w[1], torch.ones(1, 16, 16))  # no nouns: weight 1
    assert w[0, 0, 5, 5] > w[0, 0, 14, 14]  # inside the square above the far corner
    assert torch.equal(masks.mask_weights(maps, [[[2]], []], (16, 16), alpha=0.0, gamma_m=1.0), torch.ones(2, 1, 16, 16))


def test_a_pool_with_hard_negatives_keeps_them_beside_the_originals_from_the_same_seeds(tmp_path):
    from hgdpo.pool import store as pool
    from hgdpo.pool.build import build_pool
    from hgdpo.pool.config import PoolConfig

    (tmp_path / "p.txt").write_text("a red circle left of a blue square\na green triangle\n")
    cfg = PoolConfig(prompts=str(tmp_path / "p.txt"), output=str(tmp_path / "pool"), images_per_prompt=3, steps=3,
                     hard_negatives=["swap", "drop"], self_judge_questions=2)
    build_pool(cfg, local=True, mlflow=False)
    meta = pool.read_meta(tmp_path / "pool")
    assert meta["latent_shape"][0] == 6 and meta["config"]["hard_negatives"] == ["swap", "drop"]
    table = pool.read(tmp_path / "pool")
    rows = table.to_pylist()
    assert rows[0]["latent_index"] == list(range(6)) and len(rows[0]["seeds"]) == 3 and len(rows[0]["scores"]) == 3
    assert len(rows[0]["questions"]) == 2 and rows[0]["questions"][0] in ospo.questions(
        rows[0]["prompt"], ("swap", "drop"), 0, 2)
    assert np.isfinite(rows[0]["self_scores"]).all() and len(rows[0]["self_least"]) == 6
    latents = pool.latents_of(table)  # (rows, 6, C, h, w)
    assert not np.array_equal(latents[0, 0], latents[0, 3])  # the negative of seed 0 is another image
    # "a green triangle" has one object: no swap, no drop, so no question and no pair.
    assert rows[1]["questions"] == [] and np.isnan(rows[1]["self_scores"]).all()
    assert not latents[1, 3:].any()
    # The originals are the pool without hard negatives, image for image.
    plain = PoolConfig(prompts=str(tmp_path / "p.txt"), output=str(tmp_path / "plain"), images_per_prompt=3, steps=3)
    build_pool(plain, local=True, mlflow=False)
    np.testing.assert_array_equal(pool.latents_of(pool.read(tmp_path / "plain")), latents[:, :3])
    assert pool.read_meta(tmp_path / "plain")["fingerprint"].get("hard_negatives") is None  # older pools resume


@pytest.mark.parametrize("settings, message", [
    ({"hard_negatives": ["shuffle"]}, "pool.hard_negatives[0]: unknown perturbation kind 'shuffle'"),
    ({"hard_negatives": ["drop"], "keep": "pair"}, "pool.keep: hard negatives need keep: all"),
    ({"self_judge_questions": 0}, "pool.self_judge_questions: must be at least 1"),
])
def test_bad_pool_settings_are_refused_by_name(settings, message):
    from hgdpo.pool.config import PoolConfig

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PoolConfig(prompts="p.txt", output="out", **settings)


@pytest.mark.parametrize("settings, message", [
    ({"ospo_alpha": -1.0}, "train.ospo_alpha: must be >= 0"),
    ({"ospo_gamma": 0.0}, "train.ospo_gamma: must be positive"),
    ({"ospo_mask_resolutions": []}, "train.ospo_mask_resolutions: empty"),
])
def test_bad_training_settings_are_refused_by_name(settings, message):
    from hgdpo.train.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(pool="p", output="o", objective="ospo", **settings)
