"""OSPO-style prompt perturbations (hgdpo.pool.perturb, its word rules in hgdpo.pool.phrases) and the scene
helpers behind them.

Free-text cases give the exact set of results a prompt can get (collected over many seeds), so
they hold for any generator stream; world cases check every caption of a prompt set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from hgdpo.pool import phrases as P
from hgdpo.pool.perturb import KINDS, applicable_kinds, perturb, perturbations
from hgdpo.pool.phrases import noun_phrases, word_spans
from hgdpo.world.mutate import drop_spec, swap_options, swap_spec
from hgdpo.world.prompts import make_prompts
from hgdpo.world.scene import ObjectSpec, Relation, SceneSpec, canonical_key, caption_of_spec, parse_caption

SEEDS = range(200)


def outcomes(prompt: str, kind: str, **kw) -> dict[str, set[str]]:
    """detail -> the perturbed texts seen with it, over SEEDS."""
    out: dict[str, set[str]] = {}
    for s in SEEDS:
        p = perturb(prompt, kind, np.random.default_rng(s), **kw)
        out.setdefault(p.detail, set()).add(p.perturbed)
    return out


def results(prompt: str, kind: str, **kw) -> set[str]:
    return set().union(*outcomes(prompt, kind, **kw).values())


@pytest.fixture(scope="module")
def world_prompts() -> list[str]:
    return make_prompts(150, "train", seed=3) + make_prompts(50, "test", seed=3)


def _attrs(o: ObjectSpec) -> tuple:
    return (o.shape, o.color, o.size, o.position)


# --------------------------------------------------------------------------------------------
# World captions
# --------------------------------------------------------------------------------------------


def test_world_replace_changes_exactly_one_attribute(world_prompts):
    for i, text in enumerate(world_prompts):
        p = perturb(text, "replace", np.random.default_rng(i))
        old, new = parse_caption(text), parse_caption(p.perturbed)
        assert canonical_key(new) != canonical_key(old)
        assert len(new.objects) == len(old.objects)
        changed = sum(a != b for o, n in zip(old.objects, new.objects) for a, b in zip(_attrs(o), _attrs(n)))
        changed += sum(r.relation != s.relation for r, s in zip(old.relations, new.relations))
        assert changed == 1, (text, p.perturbed)
        assert p.detail.split()[0] in ("color", "shape", "size", "position", "relation")


def test_world_swap_exchanges_one_attribute_of_two_objects(world_prompts):
    swapped = 0
    for i, text in enumerate(world_prompts):
        old = parse_caption(text)
        if "swap" not in applicable_kinds(text):
            assert len(old.objects) == 1 or not swap_options(old)
            continue
        p = perturb(text, "swap", np.random.default_rng(i))
        new = parse_caption(p.perturbed)
        swapped += 1
        attr = p.detail.split()[0]
        assert canonical_key(new) != canonical_key(old)
        assert new.relations == old.relations
        for a in ("color", "shape", "size"):  # swapping keeps every multiset of values
            assert Counter(getattr(o, a) for o in new.objects) == Counter(getattr(o, a) for o in old.objects)
        diff = [k for k, (o, n) in enumerate(zip(old.objects, new.objects)) if o != n]
        assert len(diff) == 2, (text, p.perturbed)
        i0, j0 = diff
        assert getattr(new.objects[i0], attr) == getattr(old.objects[j0], attr)
        assert new.objects[i0] == replace(old.objects[i0], **{attr: getattr(old.objects[j0], attr)})
    assert swapped > 100


def test_world_drop_removes_one_object_and_its_relations(world_prompts):
    for i, text in enumerate(world_prompts):
        old = parse_caption(text)
        if len(old.objects) == 1:
            with pytest.raises(ValueError, match="needs two objects"):
                perturb(text, "drop", np.random.default_rng(i))
            continue
        p = perturb(text, "drop", np.random.default_rng(i))
        new = parse_caption(p.perturbed)
        assert len(new.objects) == len(old.objects) - 1
        assert not (Counter(new.objects) - Counter(old.objects))  # the rest are kept as they were
        assert new.relations == ()
        (dropped,) = Counter(old.objects) - Counter(new.objects)
        assert p.detail == "object " + caption_of_spec(SceneSpec((dropped,)))


def test_world_exact_examples():
    assert results("a red circle above a blue square", "swap") == {
        "a blue circle above a red square",  # colours
        "a red square above a blue circle",  # shapes
    }
    assert results("a small red circle and a large blue circle", "swap") == {
        "a small blue circle and a large red circle",
        "a large red circle and a small blue circle",
    }
    assert results("a red circle, a blue square and a black triangle", "drop") == {
        "a blue square and a black triangle",
        "a red circle and a black triangle",
        "a red circle and a blue square",
    }
    assert results("A Red Circle left of a blue square.", "drop") == {"a red circle", "a blue square"}


def test_world_swap_and_drop_refuse_single_objects_and_paraphrases():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"needs two objects.*'a red circle on the left'"):
        perturb("a red circle on the left", "swap", rng)
    # Swapping colours of two otherwise equal objects only rewords the caption.
    with pytest.raises(ValueError, match=r"no swap .*'a small red circle and a blue circle'"):
        perturb("a small red circle and a blue circle", "swap", rng)
    assert applicable_kinds("a small red circle and a blue circle") == ("replace", "drop")
    assert applicable_kinds("a red circle") == ("replace",)


def test_swap_options_keep_only_hard_negatives():
    red, blue = ObjectSpec("circle", "red"), ObjectSpec("circle", "blue")
    assert swap_options(SceneSpec((red, blue))) == {}
    assert swap_options(SceneSpec((red, blue), (Relation(0, "above", 1),))) == {"color": [(0, 1)]}
    small_red = ObjectSpec("circle", "red", "small")
    assert swap_options(SceneSpec((small_red, blue))) == {}  # "a blue circle" may be small too
    large_blue = ObjectSpec("circle", "blue", "large")
    assert swap_options(SceneSpec((small_red, large_blue))) == {"color": [(0, 1)], "size": [(0, 1)]}
    sq = ObjectSpec("square", "green")
    assert swap_options(SceneSpec((red, blue, sq))) == {"color": [(0, 2), (1, 2)], "shape": [(0, 2), (1, 2)]}


def test_swap_spec_and_drop_spec():
    spec = parse_caption("a small red circle above a blue square")
    assert swap_spec(spec, "shape", 0, 1) == parse_caption("a small red square above a blue circle")
    assert swap_spec(spec, "size", 1, 0) == parse_caption("a red circle above a small blue square")
    assert drop_spec(spec, 0) == parse_caption("a blue square")
    assert drop_spec(parse_caption("a red circle, a blue square and a black triangle"), 1) == parse_caption(
        "a red circle and a black triangle"
    )
    with pytest.raises(ValueError, match="attribute"):
        swap_spec(spec, "position", 0, 1)
    with pytest.raises(ValueError, match="cannot swap objects 0 and 0"):
        swap_spec(spec, "color", 0, 0)
    with pytest.raises(ValueError, match="needs two objects"):
        drop_spec(parse_caption("a red circle"), 0)
    with pytest.raises(ValueError, match="no object 2"):
        drop_spec(spec, 2)


def test_world_flag():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not a caption of the miniature-world grammar"):
        perturb("a red cat", "replace", rng, world=True)
    # world=False: the free-text rules, even for a caption of the grammar ("circle" is a noun).
    seen = results("a red circle and a blue square", "swap", world=False)
    assert seen == {"a red square and a blue circle", "a blue circle and a red square"}
    assert "noun circle->cat" in outcomes("a red circle and a blue square", "replace", world=False)


# --------------------------------------------------------------------------------------------
# Free text
# --------------------------------------------------------------------------------------------


def test_noun_phrase_rule():
    text = "A photo of two fluffy cats, a big brown bear and an orange on the left of a table."
    assert [n.text for n in noun_phrases(text)] == [
        "two fluffy cats", "a big brown bear", "an orange", "a table",
    ]  # "photo" is a framing word, "the left" a position, "orange" with no noun after it a noun
    assert [n.text for n in noun_phrases("red apples and the red one")] == ["red apples"]
    assert [n.text for n in noun_phrases("a red, round ball")] == ["a red, round ball"]  # coordinated
    assert [n.text for n in noun_phrases("a red. round ball")] == ["round ball"]  # other punctuation ends it
    assert noun_phrases("cats and dogs") == ()  # bare nouns are not found
    assert [n.text for n in noun_phrases("a red-haired woman and her dog's ball")] == [
        "a red-haired woman", "her dog's ball",
    ]  # compound modifiers and possessives are modifiers


def test_objects_spans_match_the_original(world_prompts):
    texts = world_prompts[:40] + [
        "A photo of two fluffy cats, a big brown bear and an orange on the left of a table.",
        "  A Red  Circle above a blue square. ",
    ]
    for i, text in enumerate(texts):
        words = word_spans(text)
        p = perturb(text, "replace", np.random.default_rng(i))
        assert p.original == text and p.objects
        for o in p.objects:
            assert text[o.chars[0]:o.chars[1]] == o.text
            s, e = o.words
            assert [w for w, _, _ in words[s:e]] == [w for w, _, _ in word_spans(o.text)]
            assert s <= o.noun < e and o.noun == e - 1
            assert words[s][1] == o.chars[0] and words[e - 1][2] == o.chars[1]
    world = perturb("  A Red  Circle above a blue square. ", "swap", np.random.default_rng(0))
    assert [(o.text, o.words, o.noun) for o in world.objects] == [("A Red  Circle", (0, 3), 2), ("a blue square", (4, 7), 6)]


def test_free_replace_color():
    seen = outcomes("a red cat next to a blue dog", "replace")
    colors = {d: s for d, s in seen.items() if d.startswith("color")}
    # red or blue becomes a colour not in the prompt; "orange" takes "an".
    expected = {f"color red->{g[0]}": {f"a {g[0]} cat next to a blue dog"} for g in P.COLOR_GROUPS if g[0] not in ("red", "blue")}
    expected |= {f"color blue->{g[0]}": {f"a red cat next to a {g[0]} dog"} for g in P.COLOR_GROUPS if g[0] not in ("red", "blue")}
    expected["color red->orange"] = {"an orange cat next to a blue dog"}
    expected["color blue->orange"] = {"a red cat next to an orange dog"}
    assert colors.keys() <= expected.keys() and len(colors) > 10
    assert all(colors[d] == expected[d] for d in colors)
    # Synonyms are not replacements of each other; case is kept.
    for text in results("The Gray cat", "replace"):
        assert "grey" not in text.lower() and text.split()[0] == "The"
    assert "The Pink cat" in results("The Gray cat", "replace")
    assert outcomes("A RED CAR", "replace")["color red->orange"] == {"AN ORANGE CAR"}


def test_free_replace_number_inflects_the_noun():
    seen = outcomes("two cats and a dog", "replace")
    numbers = {d: s for d, s in seen.items() if d.startswith("number")}
    expected = {f"number two->{w}": {f"{w} cats and a dog"} for w in P.NUMBER_WORDS[2:]}
    expected["number two->one"] = {"one cat and a dog"}
    assert numbers == expected
    assert outcomes("1 box", "replace")["number 1->3"] == {"3 boxes"}  # digits stay digits
    assert outcomes("five puppies", "replace")["number five->one"] == {"one puppy"}


def test_free_replace_relation():
    seen = outcomes("a cat to the left of a dog", "replace")
    relations = {d: s for d, s in seen.items() if d.startswith("relation")}
    assert relations == {
        f"relation to the left of->{g[0]}": {f"a cat {g[0]} a dog"} for g in P.RELATION_GROUPS[1:]
    }
    # a synonym of the same relation is never a replacement
    assert "relation on top of->above" not in outcomes("a cup on top of a book", "replace")


def test_free_replace_noun_keeps_number():
    seen = outcomes("three apples and a cup", "replace")
    for detail, texts in seen.items():
        assert detail.startswith(("noun", "number"))
        if detail.startswith("noun apples->"):
            new = detail.split("->")[1]
            assert texts == {f"three {new} and a cup"}
            assert new in {P._plural(x) for x in P.NOUNS} - {"apples", "cups"}
        if detail.startswith("noun cup->"):
            new = detail.split("->")[1]
            assert new in P.NOUNS and new not in ("apple", "cup")
            assert texts == {f"three apples and {'an' if new[0] in 'aeiou' else 'a'} {new}"}
    assert "noun cup->umbrella" in seen and seen["noun cup->umbrella"] == {"three apples and an umbrella"}


def test_free_swap():
    # the only swap: colours of different noun phrases
    assert results("a red cat next to a blue cat", "swap") == {"a blue cat next to a red cat"}
    # nouns, each inflected to the number of its new phrase
    assert results("two cats and a dog", "swap") == {"two dogs and a cat"}
    assert results("An apple and a red box", "swap") == {"A box and a red apple"}
    # two colours of one phrase are not swapped
    for text in ("a red and blue ball", "the flag is red, white and blue"):
        with pytest.raises(ValueError, match=f"no swap perturbation applies to '{text}'"):
            perturb(text, "swap", np.random.default_rng(0))
    assert results("the car is red and the house is blue", "swap") == {
        "the car is blue and the house is red", "the house is red and the car is blue",
    }


def test_free_drop():
    assert results("a cat with a hat, a dog and a bird", "drop") == {
        "a hat, a dog and a bird",  # the first phrase with the link after it
        "a cat, a dog and a bird",  # " with a hat"
        "a cat with a hat and a bird",  # list item
        "a cat with a hat and a dog",
    }
    assert results("Three green apples, a yellow banana, and an orange", "drop") == {
        "A yellow banana and an orange",
        "Three green apples and an orange",
        "Three green apples and a yellow banana",
    }
    assert results("a man riding a horse and a cow", "drop") == {"a man riding a horse"}
    assert results("a cup on top of a book, digital art", "drop") == {"a cup, digital art", "a book, digital art"}
    for text in ("a cat with a hat, a dog and a bird", "a red cat next to a blue dog"):
        for s in range(20):
            p = perturb(text, "drop", np.random.default_rng(s))
            assert len(word_spans(p.perturbed)) < len(word_spans(text))
            assert len(noun_phrases(p.perturbed)) == len(p.objects) - 1


def test_no_applicable_perturbation_names_prompt_and_kind():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"no drop perturbation applies to 'a big brown bear'"):
        perturb("a big brown bear", "drop", rng)
    with pytest.raises(ValueError, match=r"no replace perturbation applies to 'sunset'"):
        perturb("sunset", "replace", rng)
    assert applicable_kinds("a big brown bear") == ("replace",)
    assert applicable_kinds("the car is red and the house is blue") == ("replace", "swap")


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown kind 'shuffle'.*replace.*swap.*drop"):
        perturb("a red cat", "shuffle", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"unknown kind 'shuffle'"):
        perturbations(["a red cat"], kinds=("replace", "shuffle"))
    with pytest.raises(ValueError, match="kinds is empty"):
        perturbations(["a red cat"], kinds=())


def test_perturb_is_deterministic_in_the_rng():
    for text in ("a red cat next to a blue dog", "a red circle, a blue square and a black triangle"):
        for kind in KINDS:
            a = perturb(text, kind, np.random.default_rng(7))
            b = perturb(text, kind, np.random.default_rng(7))
            assert a == b


def test_perturbations_deterministic_order_independent_and_skipping(world_prompts):
    prompts = world_prompts[:30] + [
        "a red cat next to a blue dog", "two cats and a dog", "a big brown bear", "sunset",
    ]
    first = perturbations(prompts, KINDS, seed=5)
    assert first == perturbations(prompts, KINDS, seed=5)
    by_prompt = {p.original: p for p in first}
    shuffled = list(reversed(prompts))
    assert {p.original: p for p in perturbations(shuffled, KINDS, seed=5)} == by_prompt
    assert by_prompt["a big brown bear"] == perturbations(["a big brown bear"], KINDS, seed=5)[0]
    assert "sunset" not in by_prompt and len(first) == len(prompts) - 1  # nothing applies to it
    assert [p.original for p in first] == [t for t in prompts if t != "sunset"]
    assert perturbations(prompts, KINDS, seed=6) != first
    # only kinds that apply are drawn; a prompt with none of them is left out
    drops = perturbations(prompts, ("drop",), seed=5)
    assert all(p.kind == "drop" for p in drops)
    assert "a big brown bear" not in {p.original for p in drops}
    assert Counter(p.kind for p in first).keys() == set(KINDS)


def test_word_lists_are_consistent():
    modifiers = P._DETERMINERS | P._ADJECTIVES | set(P.COLOR_OF) | set(P.NUMBER_WORDS)
    assert not modifiers & P._STOP
    for relation in (p for g in P.RELATION_GROUPS for p in g):
        assert relation.split()[0] in P._STOP
    assert len(set(P.NOUNS)) == len(P.NOUNS) and not set(P.NOUNS) & (P._STOP | modifiers)
    for noun in P.NOUNS:
        assert P.singular(P._plural(noun)) == noun and not P._looks_plural(noun)
