"""OSPO-style hard negatives by perturbing the prompt: ``replace``, ``swap`` or ``drop``.

OSPO (Object-Centric Self-Improving Preference Optimization) makes the rejected image of a pair by
generating from a *perturbed* prompt and training it under the *original* one.  ``perturb``
makes one perturbation; ``perturbations`` one per prompt of a list, deterministic in the seed::

    rng = np.random.default_rng(0)
    p = perturb("a red cat next to a blue dog", "swap", rng)
    p.perturbed, p.detail        # e.g. "a blue cat next to a red dog", "color red<->blue"
    p.objects                    # the noun phrases of p.original, with their word spans
    pairs = perturbations(prompts, kinds=("replace", "drop"), seed=0)

**Captions of the miniature world** (``hgdpo.world.scene``; detected by ``parse_caption``
succeeding, or forced with ``world=True``) are perturbed exactly, on the scene spec
(``hgdpo.world.perturb``, through the judge scorer ``hgdpo.scorers.judge``):

- replace: one ``mutate_spec`` change (colour, shape, size, position or relation);
- swap: exchange the colours, shapes or sizes of two objects (``scene.swap_options``: only
  exchanges that make the caption false of every scene the original describes);
- drop: remove one object, and the relation naming it (two or more objects).

The perturbed text is the grammar's own caption (lower case), so it parses again.

**Free text** (``world=False``, or text outside the grammar) follows word rules
(``hgdpo.pool.perturb_text``; words and noun phrases: ``hgdpo.pool.phrases``).  Words are
``word_spans``: maximal runs of letters and digits, joined by inner ``'`` or ``-``.  A *noun
phrase* is a run of modifier words (determiners ``a an the these those some ...``, number words
one..ten and digits 1..10, colour words, a short adjective list ``small big wooden ...``,
possessives ``cat's``, and a hyphenated word when a noun follows it ``red-haired``)
followed by the *noun*: the next word, if it is alphabetic and not a stop word (prepositions,
conjunctions, auxiliaries, position words like left/top/background, framing words like
photo/painting).  The words of a phrase are separated by whitespace only, except that colours
and adjectives may be coordinated inside the run ("a red and blue ball", "a small, round box").
"orange" closing a run with no noun after it ("an orange on a plate") is the noun.  Bare nouns
("cats and dogs") are not found, and the noun of "a fire truck" is "fire".

- replace, one of (category drawn uniformly among those present, then the target uniformly):
  a colour word -> a colour not in the prompt; a number inside a noun phrase -> another of
  1..10 in the same form (word or digit), the noun inflected when the count crosses one; a
  relation phrase (left of / to the left of, right of, above / on top of, below / under,
  next to / beside, behind, in front of) -> another relation; a noun -> a noun of ``NOUNS``
  not in the prompt, in the phrase's number.
- swap: two colour words of different colours not in the same modifier run, or the nouns of two
  noun phrases with different nouns (each inflected to its new phrase's number).
- drop: one noun phrase with what joins it: ``X <link> NP`` loses `` <link> NP`` where the link
  is and/with/or/plus or a relation phrase; a list ``A, B and C`` is rewritten without the
  item (``A and C``); the first phrase of the text may go with the link after it.  A phrase
  joined only by other words ("a man riding a horse") is not dropped.

"a"/"an" before a changed word is fixed by its first letter (vowel -> "an"), and the case of
each replaced word is kept.  When nothing of the kind applies, ``perturb`` raises ValueError
naming the prompt and the kind.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hgdpo.pool.perturb_text import free_kinds, free_perturb
from hgdpo.pool.phrases import NounPhrase, Perturbation, noun_phrases
from hgdpo.prompts import stable_hash
from hgdpo.scorers.judge import SceneSpec, parse_caption, scene_kinds, scene_objects, scene_perturb

__all__ = ["KINDS", "applicable_kinds", "objects", "perturb", "perturbations"]

KINDS: tuple[str, ...] = ("replace", "swap", "drop")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _spec_or_none(prompt: str, world: bool | None) -> SceneSpec | None:
    if world is False:
        return None
    try:
        return parse_caption(prompt)
    except ValueError:
        if world:
            raise
        return None


def applicable_kinds(prompt: str, world: bool | None = None) -> tuple[str, ...]:
    """The kinds of KINDS that ``perturb`` can apply to ``prompt``, in KINDS order."""
    spec = _spec_or_none(prompt, world)
    return scene_kinds(spec, KINDS) if spec is not None else free_kinds(prompt, KINDS)


def objects(prompt: str, world: bool | None = None) -> tuple[NounPhrase, ...]:
    """The object noun phrases of ``prompt``: the grammar's objects for a caption of the world, else the
    free-text noun phrases (``noun_phrases``)."""
    spec = _spec_or_none(prompt, world)
    return scene_objects(prompt, spec) if spec is not None else noun_phrases(prompt)


def perturb(prompt: str, kind: str, rng: np.random.Generator, world: bool | None = None) -> Perturbation:
    """One ``kind`` perturbation of ``prompt`` (see the module docstring), deterministic in ``rng``.

    ``world``: None detects a caption of the miniature world by parsing it; True requires one
    (ValueError otherwise); False applies the free-text rules to any text.  Raises ValueError
    for an unknown kind, or when no perturbation of the kind applies to the prompt.
    """
    _check_kind(kind)
    spec = _spec_or_none(prompt, world)
    if spec is not None:
        return scene_perturb(prompt, spec, kind, rng)
    return free_perturb(prompt, kind, rng)


def perturbations(
    prompts: Sequence[str], kinds: Sequence[str] = KINDS, seed: int = 0, world: bool | None = None
) -> list[Perturbation]:
    """One perturbation per prompt, its kind drawn uniformly among the ``kinds`` that apply to it.

    Each prompt gets its own generator, seeded by a stable hash of (seed, prompt), so a prompt's
    perturbation depends on nothing else in the list (not its position, not the other prompts).
    Prompts to which none of ``kinds`` applies are left out; ``Perturbation.original`` says
    which prompt each result belongs to.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(dict.fromkeys(kinds))
    if not kinds:
        raise ValueError(f"kinds is empty; expected some of {KINDS}")
    for kind in kinds:
        _check_kind(kind)
    out = []
    for prompt in prompts:
        usable = [k for k in applicable_kinds(prompt, world) if k in kinds]
        if not usable:
            continue
        rng = np.random.default_rng(stable_hash(f"hgdpo-perturb:{int(seed)}:{prompt}"))
        out.append(perturb(prompt, usable[rng.integers(len(usable))], rng, world))
    return out
