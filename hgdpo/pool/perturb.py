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
succeeding, or forced with ``world=True``) are perturbed exactly, on the scene spec:

- replace: one ``mutate_spec`` change (colour, shape, size, position or relation);
- swap: exchange the colours, shapes or sizes of two objects (``scene.swap_options``: only
  exchanges that make the caption false of every scene the original describes);
- drop: remove one object, and the relation naming it (two or more objects).

The perturbed text is the grammar's own caption (lower case), so it parses again.

**Free text** (``world=False``, or text outside the grammar) follows word rules.  Words are
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

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hgdpo.world.scene import (
    COLORS,
    SHAPES,
    SIZES,
    SWAP_ATTRIBUTES,
    SceneSpec,
    caption_of_spec,
    drop_spec,
    mutate_spec,
    parse_caption,
    stable_hash,
    swap_options,
    swap_spec,
)

__all__ = [
    "KINDS",
    "NounPhrase",
    "Perturbation",
    "word_spans",
    "noun_phrases",
    "applicable_kinds",
    "perturb",
    "perturbations",
    "COLOR_GROUPS",
    "NUMBER_WORDS",
    "RELATION_GROUPS",
    "NOUNS",
]

KINDS: tuple[str, ...] = ("replace", "swap", "drop")

# --------------------------------------------------------------------------------------------
# Word lists (free text)
# --------------------------------------------------------------------------------------------

#: Colour words; words of one group are synonyms, the first is used as a replacement.
COLOR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("red",), ("orange",), ("yellow",), ("green",), ("blue",), ("purple", "violet"), ("pink",),
    ("brown",), ("black",), ("white",), ("grey", "gray"), ("gold", "golden"), ("silver",),
)
#: Number words for 1..10 (digits "1".."10" count too).
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: Spatial relation phrases; a group's phrases are synonyms, the first is used as a replacement.
RELATION_GROUPS: tuple[tuple[str, ...], ...] = (
    ("to the left of", "left of", "on the left of"),
    ("to the right of", "right of", "on the right of"),
    ("above", "on top of"),
    ("below", "under", "beneath", "underneath"),
    ("next to", "beside"),
    ("behind",),
    ("in front of",),
)
#: Replacement nouns (singular; plurals by the rules of ``_plural``).
NOUNS: tuple[str, ...] = (
    "cat", "dog", "bird", "horse", "cow", "sheep", "rabbit", "bear", "elephant", "giraffe", "car",
    "bus", "truck", "bicycle", "boat", "train", "apple", "banana", "cake", "cup", "bottle", "chair",
    "table", "bench", "book", "clock", "vase", "lamp", "umbrella", "ball", "box", "flower", "tree",
    "house",
)

_SINGULAR_DETS = frozenset("a an each every another".split())
_PLURAL_DETS = frozenset("these those many several few both".split())
_DETERMINERS = _SINGULAR_DETS | _PLURAL_DETS | frozenset("the some my your his her its our their".split())
_ADJECTIVES = frozenset(
    """small large big tiny huge little giant tall short long wide narrow thick thin fat round
    old young new ancient modern wooden metal metallic plastic shiny fluffy furry cute happy sad
    angry beautiful pretty ugly dark light bright pale striped spotted empty full hot cold wet dry
    soft hard heavy fancy cozy very""".split()
)
_COLOR_OF = {w: g for g, words in enumerate(COLOR_GROUPS) for w in words}
_COLOR_NOUNS = frozenset({"orange"})
_STOP = frozenset(
    """and or but nor with without of in on at to from by for into onto off over under above below
    beneath underneath beside behind between among near next top front back left right bottom
    center centre middle side background foreground is are was were be been being has have had do
    does it they them there here which who whom whose while as than then not like this that what
    where when how photo photograph picture image painting drawing illustration sketch render
    rendering view shot closeup close-up portrait style scene""".split()
)
_RELATION_PHRASES = sorted(  # (words, group), longest first
    ((tuple(p.split()), g) for g, ps in enumerate(RELATION_GROUPS) for p in ps), key=lambda x: -len(x[0])
)
#: What may join two noun phrases for one of them to be dropped with it ("a cat with a hat").
_LINKS = frozenset(
    {"and", "with", "or", "plus", "along with", "together with", "and with"}
    | {p for ps in RELATION_GROUPS for p in ps}
    | {"and " + p for ps in RELATION_GROUPS for p in ps}
)
_IRREGULAR = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "ox": "oxen", "knife": "knives",
    "leaf": "leaves", "wolf": "wolves", "shelf": "shelves", "sheep": "sheep", "fish": "fish",
    "deer": "deer", "bus": "buses",
}
_IRREGULAR_SINGULAR = {v: k for k, v in _IRREGULAR.items() if v != k}

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019-][A-Za-z0-9]+)*")
_ALPHA_RE = re.compile(r"[A-Za-z]+(?:['\u2019-][A-Za-z]+)*")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NounPhrase:
    """A noun phrase of a prompt: ``text == prompt[chars[0]:chars[1]]``; ``words`` is its span
    ``[start, end)`` in ``word_spans(prompt)`` and ``noun`` the index there of its noun."""

    text: str
    words: tuple[int, int]
    chars: tuple[int, int]
    noun: int


@dataclass(frozen=True)
class Perturbation:
    """``perturbed`` is ``original`` changed by ``kind`` as ``detail`` says ("color red->blue",
    "noun cat<->dog", "object a red circle"); ``objects`` are the noun phrases of ``original``."""

    original: str
    perturbed: str
    kind: str
    detail: str
    objects: tuple[NounPhrase, ...]


def word_spans(text: str) -> tuple[tuple[str, int, int], ...]:
    """The words of ``text`` as ``(word, start, end)`` character spans (see the module docstring)."""
    return tuple((m.group(), m.start(), m.end()) for m in _WORD_RE.finditer(text))


# --------------------------------------------------------------------------------------------
# Free text: analysis
# --------------------------------------------------------------------------------------------


def _number_value(word: str) -> int | None:
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word) + 1
    if word.isdigit() and 1 <= int(word) <= 10 and not word.startswith("0"):
        return int(word)
    return None


def _is_coordinable(word: str) -> bool:
    return word in _COLOR_OF or word in _ADJECTIVES


def _is_possessive(word: str) -> bool:
    return word.endswith(("'s", "\u2019s", "s'", "s\u2019")) and len(word) > 2


def _is_modifier(word: str) -> bool:
    return (word in _DETERMINERS or word in _COLOR_OF or word in _ADJECTIVES or _number_value(word) is not None
            or _is_possessive(word))


def _can_be_noun(word: str) -> bool:
    return bool(_ALPHA_RE.fullmatch(word)) and word not in _STOP and not _is_possessive(word)


class _Text:
    """Words, noun phrases, colour / number / relation occurrences of a free-text prompt."""

    def __init__(self, text: str):
        self.text = text
        self.words = word_spans(text)
        self.lower = tuple(w.lower() for w, _, _ in self.words)
        self.runs: list[tuple[int, int]] = []  # every modifier run [start, end), noun or not
        self.nps = self._noun_phrases()
        self.run_of_word = {k: r for r, (a, b) in enumerate(self.runs) for k in range(a, b)}
        self.np_of_word = {k: i for i, np_ in enumerate(self.nps) for k in range(*np_.words)}
        heads = {np_.noun for np_ in self.nps}
        self.colors = [k for k, w in enumerate(self.lower) if w in _COLOR_OF and k not in heads]
        self.numbers = [
            (i, k) for i, np_ in enumerate(self.nps) for k in range(np_.words[0], np_.noun)
            if _number_value(self.lower[k]) is not None
        ]
        self.relations = self._relations()

    def joined(self, a: int, b: int) -> bool:
        """Words a and b (a < b, adjacent) are separated by whitespace only."""
        return self.text[self.words[a][2]:self.words[b][1]].strip() == ""

    def _coordinated(self, j: int) -> int | None:
        """The index of the colour / adjective coordinated with word j ("red, blue", "red and
        blue", "red, and blue"; also "or"), or None."""
        w, n = self.lower, len(self.lower)
        if not _is_coordinable(w[j]) or j + 1 >= n:
            return None
        sep = self.text[self.words[j][2]:self.words[j + 1][1]]
        if re.fullmatch(r"\s*,\s*", sep) and _is_coordinable(w[j + 1]):
            return j + 1
        if (re.fullmatch(r"\s*,?\s*", sep) and w[j + 1] in ("and", "or") and j + 2 < n
                and self.joined(j + 1, j + 2) and _is_coordinable(w[j + 2])):
            return j + 2
        return None

    def _phrase(self, start: int, end: int, noun: int) -> NounPhrase:
        c0, c1 = self.words[start][1], self.words[end - 1][2]
        return NounPhrase(self.text[c0:c1], (start, end), (c0, c1), noun)

    def _noun_phrases(self) -> tuple[NounPhrase, ...]:
        out, w, n, i = [], self.lower, len(self.lower), 0
        while i < n:
            if not _is_modifier(w[i]):
                i += 1
                continue
            j = i  # the modifier run is i..j
            while True:
                if j + 1 < n and self.joined(j, j + 1) and _is_modifier(w[j + 1]):
                    j += 1
                elif (j + 2 < n and "-" in w[j + 1] and self.joined(j, j + 1) and self.joined(j + 1, j + 2)
                      and _can_be_noun(w[j + 2])):  # a compound modifier: "a red-haired woman"
                    j += 1
                elif (c := self._coordinated(j)) is not None:
                    j = c
                else:
                    break
            self.runs.append((i, j + 1))
            k = j + 1
            if k < n and self.joined(j, k) and _can_be_noun(w[k]):
                out.append(self._phrase(i, k + 1, k))
                i = k + 1
            elif j > i and w[j] in _COLOR_NOUNS:
                out.append(self._phrase(i, j + 1, j))
                i = j + 1
            else:
                i = j + 1
        return tuple(out)

    def _relations(self) -> list[tuple[int, int, int]]:
        """``(first word, end word, group)`` of each relation phrase, longest match first."""
        out, i = [], 0
        while i < len(self.lower):
            for words, g in _RELATION_PHRASES:
                e = i + len(words)
                if self.lower[i:e] == words and all(self.joined(a, a + 1) for a in range(i, e - 1)):
                    out.append((i, e, g))
                    i = e
                    break
            else:
                i += 1
        return out

    def plural(self, np_index: int) -> bool:
        """Whether a noun phrase is plural: by its determiner or number, else by its noun's form."""
        np_ = self.nps[np_index]
        for k in range(np_.words[0], np_.noun):
            w = self.lower[k]
            if w in _PLURAL_DETS or (_number_value(w) or 0) >= 2:
                return True
            if w in _SINGULAR_DETS or _number_value(w) == 1:
                return False
        return _looks_plural(self.lower[np_.noun])

    def gap(self, a: int, b: int) -> str:
        """Text between noun phrases a and b."""
        return self.text[self.nps[a].chars[1]:self.nps[b].chars[0]]


def noun_phrases(text: str) -> tuple[NounPhrase, ...]:
    """The noun phrases of free text by the rule of the module docstring."""
    return _Text(text).nps


def _looks_plural(word: str) -> bool:
    if word in _IRREGULAR_SINGULAR:
        return True
    if word in _IRREGULAR:
        return False
    return word.endswith("s") and not word.endswith(("ss", "us", "is"))


def _plural(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _singular(word: str) -> str:
    if word in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def _inflect(word: str, plural: bool) -> str:
    """``word`` (lower case) as a plural or singular noun."""
    if _looks_plural(word) == plural:
        return word
    return _plural(word) if plural else _singular(word)


def _match_case(new: str, old: str) -> str:
    if len(old) > 1 and old.isupper():
        return new.upper()
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _gap_kind(gap: str) -> str | None:
    """"list" for ", " / " and " / ", and " (or "or"), "link" for and/with/relations, else None."""
    if re.fullmatch(r"\s*(,\s*)?(and|or)?\s*", gap, re.I) and ("," in gap or gap.split()):
        return "list"
    if not re.fullmatch(r"[A-Za-z\s,]*", gap):
        return None
    return "link" if " ".join(gap.replace(",", " ").lower().split()) in _LINKS else None


# --------------------------------------------------------------------------------------------
# Free text: options and their application
# --------------------------------------------------------------------------------------------


def _free_options(t: _Text, kind: str) -> dict[str, list[tuple]]:
    used_colors = {_COLOR_OF[t.lower[k]] for k in t.colors}
    if kind == "replace":
        heads = {_singular(t.lower[np_.noun]) for np_ in t.nps}
        opts = {
            "color": [(k, g) for k in t.colors for g in range(len(COLOR_GROUPS)) if g not in used_colors],
            "number": [(i, k, v) for i, k in t.numbers for v in range(1, 11) if v != _number_value(t.lower[k])],
            "relation": [(s, e, g) for s, e, g0 in t.relations for g in range(len(RELATION_GROUPS)) if g != g0],
            "noun": [(i, noun) for i in range(len(t.nps)) for noun in NOUNS if noun not in heads],
        }
    elif kind == "swap":
        opts = {
            "color": [
                (a, b) for x, a in enumerate(t.colors) for b in t.colors[x + 1:]
                if _COLOR_OF[t.lower[a]] != _COLOR_OF[t.lower[b]] and t.run_of_word[a] != t.run_of_word[b]
            ],
            "noun": [
                (i, j) for i in range(len(t.nps)) for j in range(i + 1, len(t.nps))
                if _singular(t.lower[t.nps[i].noun]) != _singular(t.lower[t.nps[j].noun])
            ],
        }
    else:
        opts = {"object": [(k,) for k in range(len(t.nps)) if _drop_edit(t, k) is not None]}
    return {c: v for c, v in opts.items() if v}


def _with_articles(t: _Text, edits: dict[int, str]) -> dict[int, str]:
    """``edits`` (word index -> new text) plus the "a"/"an" fixes before the edited words."""
    out = dict(edits)
    for k, new in edits.items():
        if k > 0 and k - 1 not in edits and t.lower[k - 1] in ("a", "an") and t.joined(k - 1, k):
            article = "an" if new[:1].lower() in "aeiou" else "a"
            if article != t.lower[k - 1]:
                shouting = len(new) > 1 and new.isupper()  # "A BLUE BUS" -> "AN ORANGE BUS"
                out[k - 1] = article.upper() if shouting else _match_case(article, t.words[k - 1][0])
    return out


def _apply(text: str, spans: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(spans, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _apply_words(t: _Text, edits: dict[int, str]) -> str:
    edits = _with_articles(t, edits)
    return _apply(t.text, [(t.words[k][1], t.words[k][2], new) for k, new in edits.items()])


def _drop_edit(t: _Text, k: int) -> tuple[int, int, str] | None:
    """The character edit that removes noun phrase k (see the module docstring), or None."""
    n = len(t.nps)
    if n < 2:
        return None
    if k > 0 and _gap_kind(t.gap(k - 1, k)) == "link":
        return (t.nps[k - 1].chars[1], t.nps[k].chars[1], "")
    lo = k  # the list chain around k
    while lo > 0 and _gap_kind(t.gap(lo - 1, lo)) == "list":
        lo -= 1
    hi = k
    while hi + 1 < n and _gap_kind(t.gap(hi, hi + 1)) == "list":
        hi += 1
    if hi > lo and (k > lo or k == 0):
        items = [t.nps[i].text for i in range(lo, hi + 1) if i != k]
        last_gap = t.gap(hi - 1, hi).lower()
        conj = next((c for c in ("and", "or") if c in last_gap.split()), None)
        oxford = conj is not None and "," in last_gap
        if len(items) == 1:
            new = items[0]
        elif conj is None:
            new = ", ".join(items)
        else:
            new = ", ".join(items[:-1]) + ("," if oxford and len(items) > 2 else "") + f" {conj} " + items[-1]
        return (t.nps[lo].chars[0], t.nps[hi].chars[1], new)
    if k == 0 and _gap_kind(t.gap(0, 1)) == "link":
        return (t.nps[0].chars[0], t.nps[1].chars[0], "")
    return None


def _free_perturb(prompt: str, kind: str, rng: np.random.Generator) -> Perturbation:
    t = _Text(prompt)
    opts = _free_options(t, kind)
    if not opts:
        raise ValueError(f"no {kind} perturbation applies to {prompt!r}")
    categories = list(opts)
    category = categories[rng.integers(len(categories))]
    option = opts[category][rng.integers(len(opts[category]))]
    w = t.lower
    if kind == "replace" and category == "color":
        k, g = option
        new = COLOR_GROUPS[g][0]
        text, detail = _apply_words(t, {k: _match_case(new, t.words[k][0])}), f"color {w[k]}->{new}"
    elif kind == "replace" and category == "number":
        i, k, value = option
        old = w[k]
        new = str(value) if old.isdigit() else NUMBER_WORDS[value - 1]
        edits = {k: _match_case(new, t.words[k][0])}
        head = t.nps[i].noun
        if (value >= 2) != t.plural(i):
            edits[head] = _match_case(_inflect(w[head], value >= 2), t.words[head][0])
        text, detail = _apply_words(t, edits), f"number {old}->{new}"
    elif kind == "replace" and category == "relation":
        s, e, g = option
        new = RELATION_GROUPS[g][0]
        old = " ".join(w[s:e])
        text = _apply(prompt, [(t.words[s][1], t.words[e - 1][2], _match_case(new, t.words[s][0]))])
        detail = f"relation {old}->{new}"
    elif kind == "replace":
        i, noun = option
        head = t.nps[i].noun
        new = _inflect(noun, t.plural(i))
        text, detail = _apply_words(t, {head: _match_case(new, t.words[head][0])}), f"noun {w[head]}->{new}"
    elif kind == "swap" and category == "color":
        a, b = option
        edits = {a: _match_case(w[b], t.words[a][0]), b: _match_case(w[a], t.words[b][0])}
        text, detail = _apply_words(t, edits), f"color {w[a]}<->{w[b]}"
    elif kind == "swap":
        i, j = option
        a, b = t.nps[i].noun, t.nps[j].noun
        edits = {
            a: _match_case(_inflect(w[b], t.plural(i)), t.words[a][0]),
            b: _match_case(_inflect(w[a], t.plural(j)), t.words[b][0]),
        }
        text, detail = _apply_words(t, edits), f"noun {w[a]}<->{w[b]}"
    else:
        (k,) = option
        text = _apply(prompt, [_drop_edit(t, k)])
        if prompt.lstrip()[:1].isupper() and text.lstrip()[:1].islower():
            lead = len(text) - len(text.lstrip())
            text = text[:lead] + text[lead].upper() + text[lead + 1:]
        detail = f"object {t.nps[k].text}"
    if text == prompt:  # every rule changes a word; guard against a list entry that does not
        raise RuntimeError(f"{kind} left {prompt!r} unchanged ({detail})")
    return Perturbation(prompt, text, kind, detail, t.nps)


# --------------------------------------------------------------------------------------------
# World captions
# --------------------------------------------------------------------------------------------


def _world_objects(prompt: str, spec: SceneSpec) -> tuple[NounPhrase, ...]:
    """The object phrases ("a [size] colour shape") of a caption of the grammar, in order."""
    words = word_spans(prompt)
    w = [x[0].lower() for x in words]
    out, i = [], 0
    while i < len(w):
        j = i + 1 + (i + 1 < len(w) and w[i + 1] in SIZES)
        if w[i] == "a" and j + 1 < len(w) and w[j] in COLORS and w[j + 1] in SHAPES:
            c0, c1 = words[i][1], words[j + 1][2]
            out.append(NounPhrase(prompt[c0:c1], (i, j + 2), (c0, c1), j + 1))
            i = j + 2
        else:
            i += 1
    if len(out) != len(spec.objects):  # cannot happen for text parse_caption accepted
        raise RuntimeError(f"found {len(out)} object phrases in {prompt!r}, expected {len(spec.objects)}")
    return tuple(out)


def _replace_detail(old: SceneSpec, new: SceneSpec) -> str:
    for a, b in zip(old.objects, new.objects):
        for attr in ("color", "shape", "size", "position"):
            if getattr(a, attr) != getattr(b, attr):
                return f"{attr} {getattr(a, attr)}->{getattr(b, attr)}"
    for r, s in zip(old.relations, new.relations):
        if r.relation != s.relation:
            return f"relation {r.relation}->{s.relation}"
    raise RuntimeError("mutate_spec changed nothing")  # cannot happen


def _world_options(spec: SceneSpec, kind: str) -> dict:
    if kind == "replace":
        return {"mutate": [()]}  # mutate_spec always has a colour to change
    if kind == "swap":
        return swap_options(spec)
    return {"object": [(k,) for k in range(len(spec.objects))]} if len(spec.objects) >= 2 else {}


def _world_perturb(prompt: str, spec: SceneSpec, kind: str, rng: np.random.Generator) -> Perturbation:
    objects = _world_objects(prompt, spec)
    if kind != "replace" and len(spec.objects) < 2:
        raise ValueError(f"{kind} needs two objects; {prompt!r} has one")
    opts = _world_options(spec, kind)
    if not opts:
        raise ValueError(f"no {kind} of two objects of {prompt!r} changes what it states")
    if kind == "replace":
        new = mutate_spec(spec, rng)
        detail = _replace_detail(spec, new)
    elif kind == "swap":
        attrs = [a for a in SWAP_ATTRIBUTES if a in opts]
        attr = attrs[rng.integers(len(attrs))]
        i, j = opts[attr][rng.integers(len(opts[attr]))]
        new = swap_spec(spec, attr, i, j)
        detail = f"{attr} {getattr(spec.objects[i], attr)}<->{getattr(spec.objects[j], attr)}"
    else:
        k = int(rng.integers(len(spec.objects)))
        new = drop_spec(spec, k)
        detail = "object " + caption_of_spec(SceneSpec((spec.objects[k],)))
    return Perturbation(prompt, caption_of_spec(new), kind, detail, objects)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


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
    if spec is not None:
        return tuple(k for k in KINDS if _world_options(spec, k))
    t = _Text(prompt)
    return tuple(k for k in KINDS if _free_options(t, k))


def objects(prompt: str, world: bool | None = None) -> tuple[NounPhrase, ...]:
    """The object noun phrases of ``prompt``: the grammar's objects for a caption of the world, else the
    free-text noun phrases (``noun_phrases``)."""
    spec = _spec_or_none(prompt, world)
    return _world_objects(prompt, spec) if spec is not None else noun_phrases(prompt)


def perturb(prompt: str, kind: str, rng: np.random.Generator, world: bool | None = None) -> Perturbation:
    """One ``kind`` perturbation of ``prompt`` (see the module docstring), deterministic in ``rng``.

    ``world``: None detects a caption of the miniature world by parsing it; True requires one
    (ValueError otherwise); False applies the free-text rules to any text.  Raises ValueError
    for an unknown kind, or when no perturbation of the kind applies to the prompt.
    """
    _check_kind(kind)
    spec = _spec_or_none(prompt, world)
    if spec is not None:
        return _world_perturb(prompt, spec, kind, rng)
    return _free_perturb(prompt, kind, rng)


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
