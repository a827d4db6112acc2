"""The miniature world (hgdpo.world): scenes, captions, renders, prompt splits, and the judge.

The judge must rank an image that shows its caption far above one that is wrong in a single
attribute, on clean renders and on blurred / noisy ones like a weak diffusion model makes.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from hgdpo.world.judge import judge, judge_batch, judge_details
from hgdpo.world.mutate import mutate_caption
from hgdpo.world.prompts import make_pairs, make_prompts, split_of, write_prompts
from hgdpo.world.render import coverage, degrade, render, render_batch, render_captions
from hgdpo.world.scene import (
    BACKGROUND,
    COLORS,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    Relation,
    SceneSpec,
    canonical_key,
    caption,
    parse_caption,
    sample_scene,
    sample_spec,
    scene_from_caption,
)
from hgdpo.world.segmentation import detect

N_TEST = 200


@pytest.fixture(scope="module")
def bench():
    """200 held-out prompts, a hard negative of each, and renders of both (clean + degraded)."""
    prompts = make_prompts(N_TEST, "test", seed=0)
    muts = [m for _, m in make_pairs(prompts, seed=0)]
    own_imgs, _ = render_captions(prompts, 64, seed=1)
    mut_imgs, _ = render_captions(muts, 64, seed=2)
    rng = np.random.default_rng(3)
    own_deg = degrade(own_imgs, rng, blur=1.0, noise=12.0, color_shift=8.0)
    mut_deg = degrade(mut_imgs, rng, blur=1.0, noise=12.0, color_shift=8.0)
    return prompts, muts, own_imgs, mut_imgs, own_deg, mut_deg


# ---------------------------------------------------------------------------------- captions


def test_caption_round_trips_through_parse():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = sample_scene(rng)
        text = caption(scene)
        assert parse_caption(text) == scene.spec
        assert parse_caption("  " + text.upper() + ". ") == scene.spec


def test_grammar_examples_parse():
    spec = parse_caption("a large red circle on the left")
    assert spec == SceneSpec((ObjectSpec("circle", "red", "large", "on the left"),))
    spec = parse_caption("a blue square above a yellow triangle")
    assert spec.objects == (ObjectSpec("square", "blue"), ObjectSpec("triangle", "yellow"))
    assert spec.relations == (Relation(0, "above", 1),)
    assert parse_caption("a red circle left of a green square").relations[0].relation == "left of"
    assert len(parse_caption("a red circle, a blue square and a yellow triangle").objects) == 3
    assert parse_caption("a small blue square at the top").objects[0].size == "small"


@pytest.mark.parametrize(
    "bad",
    ["", "a circle", "a red circle on the moon", "a red circle and a red square", "two red circles", "a orange circle"],
)
def test_parse_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_rendered_scenes_make_their_captions_true():
    """The sampler's layouts satisfy the stated positions and relations and never overlap."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = sample_scene(rng)
        objs = scene.objects
        for o in objs:
            assert 0 <= o.box[0] and o.box[2] <= 1 and 0 <= o.box[1] and o.box[3] <= 1
        for a, b in itertools.combinations(objs, 2):
            ax0, ay0, ax1, ay1 = a.box
            bx0, by0, bx1, by1 = b.box
            assert bx0 >= ax1 or ax0 >= bx1 or by0 >= ay1 or ay0 >= by1
        for o, spec in zip(objs, scene.spec.objects):
            if spec.size:
                assert o.size == spec.size
            if spec.position == "on the left":
                assert o.x < 0.5 and abs(o.y - 0.5) < 0.5 - o.x
            if spec.position == "in the center":
                assert abs(o.x - 0.5) < 0.05 and abs(o.y - 0.5) < 0.05
        for r in scene.spec.relations:
            a, b = objs[r.subject], objs[r.object]
            if r.relation == "above":
                assert b.y - a.y > abs(a.x - b.x)
            if r.relation == "right of":
                assert a.x - b.x > abs(a.y - b.y)


def test_mutate_caption_changes_exactly_one_attribute():
    rng = np.random.default_rng(2)
    for text in make_prompts(300, "train", seed=5):
        mut = mutate_caption(text, rng)
        a, b = parse_caption(text), parse_caption(mut)
        assert mut != text
        assert len(a.objects) == len(b.objects)
        diffs = sum(x.relation != y.relation for x, y in zip(a.relations, b.relations))
        for x, y in zip(a.objects, b.objects):
            diffs += sum(getattr(x, k) != getattr(y, k) for k in ("shape", "color", "size", "position"))
            assert (x.size is None) == (y.size is None) and (x.position is None) == (y.position is None)
        assert diffs == 1, (text, mut)
    with pytest.raises(ValueError):
        mutate_caption("a red circle", rng, kind="relation")


# ---------------------------------------------------------------------------------- prompts


def test_prompt_splits_are_disjoint_deterministic_and_stable():
    train = make_prompts(400, "train", seed=0)
    test = make_prompts(200, "test", seed=0)
    assert len(set(train)) == 400 and len(set(test)) == 200
    assert not {canonical_key(c) for c in train} & {canonical_key(c) for c in test}
    assert make_prompts(400, "train", seed=0) == train
    assert make_prompts(100, "test", seed=0) == test[:100]  # any n: a prefix of a larger n
    assert set(make_prompts(200, "test", seed=1)) != set(test)
    assert all(split_of(c) == "test" for c in make_prompts(200, "test", seed=1))
    assert all(split_of(c) == "train" for c in train)
    # paraphrases fall on the same side
    assert split_of("a red circle above a blue square") == split_of("a blue square below a red circle")
    assert split_of("a red circle and a blue square") == split_of("a blue square and a red circle")
    with pytest.raises(ValueError):
        make_prompts(3, "val")


def test_write_prompts(tmp_path: Path):
    out = tmp_path / "sub" / "test.txt"
    prompts = write_prompts(out, 25, "test", seed=3)
    assert out.read_text(encoding="utf-8").splitlines() == prompts == make_prompts(25, "test", seed=3)


# ---------------------------------------------------------------------------------- rendering


def test_render_basics():
    rng = np.random.default_rng(4)
    scene = scene_from_caption("a large red square in the center", rng)
    img = render(scene, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[1, 1]) == BACKGROUND
    assert tuple(img[32, 32]) == PALETTE["red"]
    assert np.array_equal(render(scene, 64), img)  # deterministic without rng
    batch = render_batch([scene, scene], 32)
    assert batch.shape == (2, 32, 32, 3)
    # antialiasing: coverage sums to the shape's area
    _, _, cov = coverage("circle", 0.5, 0.5, 0.5, 128, 128)
    assert abs(cov.sum() - np.pi * 32**2) / (np.pi * 32**2) < 0.01
    _, _, cov = coverage("triangle", 0.5, 0.5, 0.5, 128, 128)
    assert abs(cov.sum() - 0.5 * 64**2) / (0.5 * 64**2) < 0.01


# ---------------------------------------------------------------------------------- judge


def test_own_renders_score_near_the_top(bench):
    prompts, _, own_imgs, *_ = bench
    own = judge_batch(own_imgs, prompts)
    assert own.mean() >= 0.9, own.mean()
    assert own.min() >= 0.7, (own.min(), prompts[int(own.argmin())])


def test_renders_of_mutated_captions_score_clearly_lower(bench):
    prompts, muts, own_imgs, mut_imgs, *_ = bench
    own = judge_batch(own_imgs, prompts)
    mutated = judge_batch(mut_imgs, prompts)  # images right for m, wrong in one thing for c
    swapped = judge_batch(own_imgs, muts)  # the same images judged against the negative caption
    assert own.mean() - mutated.mean() >= 0.3
    assert own.mean() - swapped.mean() >= 0.3
    assert (own > mutated).mean() >= 0.95
    assert (own > swapped).mean() >= 0.95


def test_blurred_noisy_renders_still_beat_their_mutated_counterparts(bench):
    prompts, muts, _, _, own_deg, mut_deg = bench
    own = judge_batch(own_deg, prompts)
    mutated = judge_batch(mut_deg, prompts)
    assert (own > mutated).mean() >= 0.9
    assert own.mean() - mutated.mean() >= 0.3
    # but a degraded image scores below a clean one: cleanliness is part of the score
    clean = judge_batch(bench[2], prompts)
    assert own.mean() < clean.mean() - 0.05


def test_blank_and_garbage_images_score_near_zero():
    captions = ["a red circle", "a large blue square on the left", "a green triangle above a black circle", "a red circle, a blue square and a yellow triangle"]
    rng = np.random.default_rng(5)
    images = {
        "background": np.full((64, 64, 3), BACKGROUND, np.uint8),
        "white": np.full((64, 64, 3), 255, np.uint8),
        "noise": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "red field": np.tile(np.asarray(PALETTE["red"], np.uint8), (64, 64, 1)),
    }
    for name, img in images.items():
        for c in captions:
            assert judge(img, c) < 0.15, (name, c, judge(img, c))
    assert judge(images["background"], "a red circle") < 0.05


def test_judge_partial_credit_is_graded():
    """One of two objects right beats none right; a wrong colour costs more than a wrong shape."""
    rng = np.random.default_rng(6)
    img = render(scene_from_caption("a red circle", rng))
    two = judge(img, "a red circle and a blue square")
    none = judge(np.full((64, 64, 3), BACKGROUND, np.uint8), "a red circle and a blue square")
    assert none < two < 0.3
    assert judge(img, "a red circle") > 0.9
    assert judge(img, "a red square") > judge(img, "a blue circle")


def test_judge_accepts_float_images_and_other_sizes():
    rng = np.random.default_rng(7)
    for size in (32, 96):
        for text in make_prompts(10, "test", seed=2):
            img = render(scene_from_caption(text, rng), size)
            assert judge(img, text) > 0.8, (size, text)
            assert abs(judge(img.astype(np.float32) / 255.0, text) - judge(img, text)) < 1e-3


def test_detect_finds_each_object_once_under_noise():
    rng = np.random.default_rng(8)
    text = "a large black square, a large yellow square and a small purple circle"
    clean = render(scene_from_caption(text, rng))
    noisy = degrade(clean, rng, blur=1.0, noise=20.0)
    for img in (clean, noisy):
        det = detect(img)
        assert sorted(b.color for b in det.blobs) == ["black", "purple", "yellow"]
        assert {b.color: b.shape for b in det.blobs} == {"black": "square", "yellow": "square", "purple": "circle"}
    assert detect(noisy).blur > detect(clean).blur == 0.0
    j = judge_details(noisy, text)
    assert j.cleanliness < judge_details(clean, text).cleanliness


def test_vocabulary_is_consistent():
    assert len(COLORS) == 6 and len(SHAPES) == 3 and len(POSITIONS) == 5 and len(RELATIONS) == 4
    pal = np.asarray([PALETTE[c] for c in COLORS], float)
    dist = np.linalg.norm(pal[:, None] - pal[None], axis=-1)
    assert dist[~np.eye(len(COLORS), dtype=bool)].min() > 100
    assert np.linalg.norm(pal - np.asarray(BACKGROUND), axis=1).min() > 150
    assert sample_spec(np.random.default_rng(0), n_objects=3).objects.__len__() == 3
