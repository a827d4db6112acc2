"""The words of a prompt for the perturbation rules (``hgdpo.pool.perturb``): word lists, words, noun
phrases, singular and plural, and the records of a perturbation (``NounPhrase``, ``Perturbation``).

Words are ``word_spans``: maximal runs of letters and digits, joined by inner ``'`` or ``-``. A noun
phrase is a run of modifier words (determiners, number words and digits 1..10, colour words, a short
adjective list, possessives, a hyphenated word before a noun) followed by its noun; the rules are
those of ``hgdpo.pool.perturb``'s docstring. ``ParsedText`` holds a free-text prompt read so: its
words, noun phrases, modifier runs, and its colour, number and relation occurrences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
COLOR_OF = {w: g for g, words in enumerate(COLOR_GROUPS) for w in words}
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
LINKS = frozenset(
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


def number_value(word: str) -> int | None:
    """The count a number word or digit 1..10 stands for, else None."""
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word) + 1
    if word.isdigit() and 1 <= int(word) <= 10 and not word.startswith("0"):
        return int(word)
    return None


def _is_coordinable(word: str) -> bool:
    return word in COLOR_OF or word in _ADJECTIVES


def _is_possessive(word: str) -> bool:
    return word.endswith(("'s", "\u2019s", "s'", "s\u2019")) and len(word) > 2


def _is_modifier(word: str) -> bool:
    return (word in _DETERMINERS or word in COLOR_OF or word in _ADJECTIVES or number_value(word) is not None
            or _is_possessive(word))


def _can_be_noun(word: str) -> bool:
    return bool(_ALPHA_RE.fullmatch(word)) and word not in _STOP and not _is_possessive(word)


class ParsedText:
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
        self.colors = [k for k, w in enumerate(self.lower) if w in COLOR_OF and k not in heads]
        self.numbers = [
            (i, k) for i, np_ in enumerate(self.nps) for k in range(np_.words[0], np_.noun)
            if number_value(self.lower[k]) is not None
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
            if w in _PLURAL_DETS or (number_value(w) or 0) >= 2:
                return True
            if w in _SINGULAR_DETS or number_value(w) == 1:
                return False
        return _looks_plural(self.lower[np_.noun])

    def gap(self, a: int, b: int) -> str:
        """Text between noun phrases a and b."""
        return self.text[self.nps[a].chars[1]:self.nps[b].chars[0]]


def noun_phrases(text: str) -> tuple[NounPhrase, ...]:
    """The noun phrases of free text by the rule of the module docstring."""
    return ParsedText(text).nps


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


def singular(word: str) -> str:
    """``word`` (a lower-case noun) in the singular."""
    if word in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def inflect(word: str, plural: bool) -> str:
    """``word`` (lower case) as a plural or singular noun."""
    if _looks_plural(word) == plural:
        return word
    return _plural(word) if plural else singular(word)


def match_case(new: str, old: str) -> str:
    """``new`` in the case of the word ``old`` it replaces (upper case, capitalised or lower case)."""
    if len(old) > 1 and old.isupper():
        return new.upper()
    return new[:1].upper() + new[1:] if old[:1].isupper() else new
