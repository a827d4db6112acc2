"""The object-level report on rendered scenes (ground truth known), and its summary by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hgdpo.report.winrates import win_rate
from hgdpo.world.judge import judge_details
from hgdpo.world.objects import (
    RATES,
    SATISFIED,
    ObjectReport,
    ObjectResult,
    RelationResult,
    object_report,
    report_of_judgement,
    summarize,
)
from hgdpo.world.render import render
from hgdpo.world.scene import Scene, parse_caption, place

TRIPLE = "a small red circle, a large blue square and a small green triangle"
CAPTIONS = [
    TRIPLE,
    "a red circle above a blue square",
    "a large yellow triangle left of a small black circle",
    "a green square and a purple circle",
    "a large red circle on the left",
    "a small blue triangle at the bottom",
    "a black square in the center",
]


def scene_of(caption: str, seed: int) -> Scene:
    return place(parse_caption(caption), np.random.default_rng(seed))


def drawn(scene: Scene, changes: dict) -> Scene:
    """``scene`` with objects changed (``changes``: index -> dict of new attributes) or dropped
    (index -> None); the caption (spec) stays the same."""
    objs = []
    for i, o in enumerate(scene.objects):
        change = changes.get(i, {})
        if change is not None:
            objs.append(replace(o, **change))
    return Scene(tuple(objs), scene.spec)


def report(scene: Scene, caption: str) -> ObjectReport:
    return object_report(render(scene), caption)


# --------------------------------------------------------------------------------------------
# object_report on renders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption", CAPTIONS)
def test_a_correct_render_has_every_accuracy_one_and_no_leak(caption):
    for seed in range(3):
        r = report(scene_of(caption, seed), caption)
        n = len(parse_caption(caption).objects)
        assert (r.objects, r.matched, r.colour_ok, r.shape_ok, r.leaks) == (n, n, n, n, 0)
        assert r.size_ok == r.size_stated and r.position_ok == r.position_stated
        assert r.relations_ok == r.relations == len(parse_caption(caption).relations)
    assert report(scene_of(TRIPLE, 0), TRIPLE).size_stated == 3
    assert report(scene_of(CAPTIONS[4], 0), CAPTIONS[4]).position_stated == 1


def test_correct_renders_summarize_to_accuracy_one_and_no_leakage():
    reports = [report(scene_of(c, s), c) for c in CAPTIONS for s in range(2)]
    m = summarize(reports, reports, [c for c in CAPTIONS for _ in range(2)], resamples=200)
    for name in RATES:
        expected = 0.0 if name == "leakage" else 1.0
        assert (m[f"{name}_a"], m[f"{name}_a_low"], m[f"{name}_a_high"]) == (expected,) * 3
        assert (m[f"{name}_diff"], m[f"{name}_diff_low"], m[f"{name}_diff_high"]) == (0.0,) * 3
    # 3 + 2 + 2 + 2 + 1 + 1 + 1 objects per round, two rounds; sizes stated: 3 + 2 + 1 + 1
    assert (m["objects"], m["objects_size_stated"], m["objects_position_stated"], m["relations"]) == (24, 14, 6, 4)


def test_one_object_in_another_caption_objects_colour_is_one_leak():
    for seed in range(3):
        scene = scene_of(TRIPLE, seed)
        r = report(drawn(scene, {0: {"color": "blue"}}), TRIPLE)  # the red circle drawn blue
        assert r.leaks == 1 and [o.leak_from for o in r.per_object] == [1, None, None]
        assert r.colour_ok == 2  # colour accuracy (n - 1) / n
        assert (r.matched, r.shape_ok, r.size_ok) == (3, 3, 3)
    pair = "a red circle above a blue square"
    r = report(drawn(scene_of(pair, 0), {1: {"color": "red"}}), pair)
    assert [o.leak_from for o in r.per_object] == [None, 0] and r.colour_ok == 1 and r.relations_ok == 1


def test_a_colour_no_caption_object_has_is_a_colour_error_but_no_leak():
    r = report(drawn(scene_of(TRIPLE, 0), {0: {"color": "purple"}}), TRIPLE)
    assert (r.colour_ok, r.shape_ok, r.leaks) == (2, 3, 0)


def test_an_exchange_of_colours_is_counted_as_the_judge_reads_it():
    # Colour costs the judge 1.5, shape 1 (plus 1 for a stated size): two unsized objects of
    # exchanged colours read as two wrong shapes (and here a relation the other way round) ...
    pair = "a red circle above a blue square"
    r = report(drawn(scene_of(pair, 0), {0: {"color": "blue"}, 1: {"color": "red"}}), pair)
    assert (r.colour_ok, r.shape_ok, r.leaks, r.relations_ok) == (2, 0, 0, 0)
    # ... but when the sizes differ too, the object is found by shape and size: two leaks.
    r = report(drawn(scene_of(TRIPLE, 0), {0: {"color": "blue"}, 1: {"color": "red"}}), TRIPLE)
    assert (r.colour_ok, r.shape_ok, r.size_ok, r.leaks) == (1, 3, 3, 2)
    assert [o.leak_from for o in r.per_object] == [1, 0, None]


def test_a_missing_object_is_not_matched_and_every_attribute_of_it_is_wrong():
    r = report(drawn(scene_of(TRIPLE, 0), {1: None}), TRIPLE)  # no blue square
    missing = r.per_object[1]
    assert not missing.matched and missing.blob is None
    assert (missing.colour_ok, missing.shape_ok, missing.size_ok, missing.leak) == (False, False, False, False)
    assert (r.matched, r.colour_ok, r.shape_ok, r.size_ok, r.size_stated, r.leaks) == (2, 2, 2, 2, 3, 0)
    single = "a large red circle on the left"
    r = report(drawn(scene_of(single, 0), {0: None}), single)  # a blank image
    assert (r.matched, r.colour_ok, r.shape_ok, r.size_ok, r.position_ok) == (0, 0, 0, 0, 0)
    assert (r.size_stated, r.position_stated) == (1, 1)
    pair = "a red circle above a blue square"
    r = report(drawn(scene_of(pair, 0), {0: None}), pair)
    assert r.relations == 1 and r.relations_ok == 0 and r.per_relation[0].satisfaction is None


def test_relation_satisfied_and_violated():
    above, below = "a red circle above a blue square", "a red circle below a blue square"
    ok = report(scene_of(above, 0), above).per_relation[0]
    assert ok.satisfied and ok.satisfaction >= SATISFIED
    bad = report(scene_of(below, 0), above)  # drawn below, captioned above
    assert (bad.matched, bad.colour_ok, bad.shape_ok, bad.relations_ok) == (2, 2, 2, 0)
    assert bad.per_relation[0].satisfaction < SATISFIED


def test_wrong_size_and_position():
    caption = "a large red circle on the left"
    r = report(scene_of("a small red circle on the right", 0), caption)
    o = r.per_object[0]
    assert (o.colour_ok, o.shape_ok, o.size_ok, o.position_ok) == (True, True, False, False)
    assert o.size_satisfaction < SATISFIED and o.position_satisfaction < SATISFIED
    unstated = report(scene_of("a small red circle on the right", 0), "a red circle")
    assert (unstated.size_stated, unstated.position_stated, unstated.per_object[0].size_ok) == (0, 0, None)


def test_report_of_judgement_is_object_report():
    image = render(drawn(scene_of(TRIPLE, 1), {2: {"color": "red", "shape": "circle"}}))
    j = judge_details(image, TRIPLE)
    assert report_of_judgement(j, TRIPLE) == object_report(image, TRIPLE)
    assert report_of_judgement(j, parse_caption(TRIPLE)).score == j.score
    with pytest.raises(ValueError, match="matches 3 objects"):
        report_of_judgement(j, "a red circle")


# --------------------------------------------------------------------------------------------
# summarize on hand-made reports
# --------------------------------------------------------------------------------------------

SINGLE = "a large red circle on the left"
PAIR = "a red circle above a small blue square"


def obj(spec, found=True, colour=True, shape=True, size=True, position=True, leak_from=None) -> ObjectResult:
    return ObjectResult(spec, 0 if found else None, found and colour, found and shape,
                        None if spec.size is None else found and size,
                        None if spec.position is None else found and position, leak_from)


def made(caption: str, objects: list[dict], relations: tuple[bool, ...] = ()) -> ObjectReport:
    spec = parse_caption(caption)
    return ObjectReport(caption, tuple(obj(o, **kw) for o, kw in zip(spec.objects, objects)),
                        tuple(RelationResult(r, ok, None) for r, ok in zip(spec.relations, relations)), 0.0)


def hand_made():
    groups = ["p", "p", "q"]
    a = [made(SINGLE, [{}]),  # all right
         made(SINGLE, [{"colour": False, "position": False}]),
         made(PAIR, [{}, {"colour": False, "leak_from": 0}], (True,))]  # the square drawn red
    b = [made(SINGLE, [{"found": False}]),
         made(SINGLE, [{}]),
         made(PAIR, [{}, {"found": False}], (False,))]
    return a, b, groups


def test_summarize_by_hand():
    a, b, groups = hand_made()
    m = summarize(a, b, groups, resamples=500)
    # objects 1 + 1 + 2 = 4; sizes stated 1 + 1 + 1 = 3; positions stated 1 + 1; one relation
    assert (m["objects"], m["objects_size_stated"], m["objects_position_stated"], m["relations"]) == (4, 3, 2, 1)
    expected = {
        # name: (A, B)
        "object_found": (4 / 4, (0 + 1 + 1) / 4),
        "object_colour_acc": ((1 + 0 + 1) / 4, (0 + 1 + 1) / 4),
        "object_shape_acc": ((1 + 1 + 2) / 4, (0 + 1 + 1) / 4),
        "object_size_acc": ((1 + 1 + 1) / 3, (0 + 1 + 0) / 3),  # B: the missing square's size is wrong
        "object_position_acc": ((1 + 0) / 2, (0 + 1) / 2),
        "relation_acc": (1 / 1, 0 / 1),
        "leakage": ((0 + 0 + 1) / 4, 0 / 4),
    }
    assert set(expected) == set(RATES)
    for name, (rate_a, rate_b) in expected.items():
        assert m[f"{name}_a"] == pytest.approx(rate_a)
        assert m[f"{name}_b"] == pytest.approx(rate_b)
        assert m[f"{name}_diff"] == pytest.approx(rate_a - rate_b)
        for side in ("a", "b", "diff"):
            assert m[f"{name}_{side}_low"] <= m[f"{name}_{side}"] + 1e-12 <= m[f"{name}_{side}_high"] + 2e-12
    # only prompt q has a relation, always right for A and wrong for B: resamples without q are
    # left out, every other one gives a difference of exactly 1
    assert (m["relation_acc_diff_low"], m["relation_acc_diff_high"]) == (1.0, 1.0)
    assert all(isinstance(v, float) for v in m.values())


def test_summarize_resamples_prompts_as_win_rate_does():
    # one object per image: the colour accuracy of A is the win rate of its 0/1 outcomes over 0.5
    rng = np.random.default_rng(4)
    ok = rng.random(60) < 0.7
    groups = np.repeat(np.arange(20), 3)
    a = [made(SINGLE, [{"colour": bool(x)}]) for x in ok]
    m = summarize(a, a, groups, resamples=700, seed=5)
    wr = win_rate(ok.astype(float), np.full(60, 0.5), groups, resamples=700, seed=5)
    assert (m["object_colour_acc_a"], m["object_colour_acc_a_low"], m["object_colour_acc_a_high"]) == \
        pytest.approx((wr.rate, wr.low, wr.high))


def simulated(prompts: int, seed: int):
    """Two images per prompt of PAIR; A gets each colour right with p 0.8, B with 0.6."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for _ in range(2 * prompts):
        ca, cb = rng.random(2) < 0.8, rng.random(2) < 0.6
        a.append(made(PAIR, [{"colour": bool(x)} for x in ca], (True,)))
        b.append(made(PAIR, [{"colour": bool(x)} for x in cb], (True,)))
    return a, b, np.repeat(np.arange(prompts), 2)


def test_summarize_diff_interval_contains_the_true_diff():
    a, b, groups = simulated(150, seed=0)
    m = summarize(a, b, groups)
    assert m["object_colour_acc_diff_low"] <= 0.8 - 0.6 <= m["object_colour_acc_diff_high"]
    assert m["object_colour_acc_diff_low"] > 0  # 600 objects a side tell a 0.2 difference apart
    assert m["object_colour_acc_a_low"] <= 0.8 <= m["object_colour_acc_a_high"]
    assert m["object_colour_acc_b_low"] <= 0.6 <= m["object_colour_acc_b_high"]


def test_summarize_intervals_shrink_with_more_prompts():
    a, b, groups = simulated(30, seed=1)
    few = summarize(a, b, groups)
    # the same prompts four times over as new prompts: same rates, about half the width
    many = summarize(a * 4, b * 4, np.concatenate([groups + 1000 * r for r in range(4)]))
    for side in ("a", "b", "diff"):
        key = f"object_colour_acc_{side}"
        assert many[key] == pytest.approx(few[key])
        width_few, width_many = few[key + "_high"] - few[key + "_low"], many[key + "_high"] - many[key + "_low"]
        assert 0.35 * width_few < width_many < 0.7 * width_few


def test_summarize_leaves_out_rates_no_caption_states():
    r = made("a red circle and a blue square", [{}, {}])
    m = summarize([r], [r], ["p"], resamples=10)
    assert "object_colour_acc_a" in m and "object_size_acc_a" not in m and "relation_acc_diff" not in m
    assert (m["objects_size_stated"], m["relations"]) == (0.0, 0.0)


def test_summarize_refuses_unpaired_input():
    a, b, groups = hand_made()
    with pytest.raises(ValueError, match="paired one to one"):
        summarize(a, b[:2], groups)
    with pytest.raises(ValueError, match="comparison 0 pairs"):
        summarize(a, [b[2], b[1], b[0]], groups)
    with pytest.raises(ValueError, match="no reports"):
        summarize([], [], [])
    with pytest.raises(ValueError, match="confidence=1"):
        summarize(a, b, groups, confidence=1)
