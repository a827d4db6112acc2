"""Perturbations of free text by word rules (``hgdpo.pool.perturb``'s docstring: replace, swap, drop).

``free_kinds`` says which kinds apply to a prompt and ``free_perturb`` makes one, from the prompt's
words and noun phrases (``hgdpo.pool.phrases.ParsedText``): it draws a category among those present,
then an option of it, edits the words, and fixes "a"/"an" before a changed word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from hgdpo.pool.phrases import (
    COLOR_GROUPS,
    COLOR_OF,
    LINKS,
    NOUNS,
    NUMBER_WORDS,
    RELATION_GROUPS,
    ParsedText,
    Perturbation,
    inflect,
    match_case,
    number_value,
    singular,
)


def _gap_kind(gap: str) -> str | None:
    """"list" for ", " / " and " / ", and " (or "or"), "link" for and/with/relations, else None."""
    if re.fullmatch(r"\s*(,\s*)?(and|or)?\s*", gap, re.I) and ("," in gap or gap.split()):
        return "list"
    if not re.fullmatch(r"[A-Za-z\s,]*", gap):
        return None
    return "link" if " ".join(gap.replace(",", " ").lower().split()) in LINKS else None


def _free_options(t: ParsedText, kind: str) -> dict[str, list[tuple]]:
    used_colors = {COLOR_OF[t.lower[k]] for k in t.colors}
    if kind == "replace":
        heads = {singular(t.lower[np_.noun]) for np_ in t.nps}
        opts = {
            "color": [(k, g) for k in t.colors for g in range(len(COLOR_GROUPS)) if g not in used_colors],
            "number": [(i, k, v) for i, k in t.numbers for v in range(1, 11) if v != number_value(t.lower[k])],
            "relation": [(s, e, g) for s, e, g0 in t.relations for g in range(len(RELATION_GROUPS)) if g != g0],
            "noun": [(i, noun) for i in range(len(t.nps)) for noun in NOUNS if noun not in heads],
        }
    elif kind == "swap":
        opts = {
            "color": [
                (a, b) for x, a in enumerate(t.colors) for b in t.colors[x + 1:]
                if COLOR_OF[t.lower[a]] != COLOR_OF[t.lower[b]] and t.run_of_word[a] != t.run_of_word[b]
            ],
            "noun": [
                (i, j) for i in range(len(t.nps)) for j in range(i + 1, len(t.nps))
                if singular(t.lower[t.nps[i].noun]) != singular(t.lower[t.nps[j].noun])
            ],
        }
    else:
        opts = {"object": [(k,) for k in range(len(t.nps)) if _drop_edit(t, k) is not None]}
    return {c: v for c, v in opts.items() if v}


def _with_articles(t: ParsedText, edits: dict[int, str]) -> dict[int, str]:
    """``edits`` (word index -> new text) plus the "a"/"an" fixes before the edited words."""
    out = dict(edits)
    for k, new in edits.items():
        if k > 0 and k - 1 not in edits and t.lower[k - 1] in ("a", "an") and t.joined(k - 1, k):
            article = "an" if new[:1].lower() in "aeiou" else "a"
            if article != t.lower[k - 1]:
                shouting = len(new) > 1 and new.isupper()  # "A BLUE BUS" -> "AN ORANGE BUS"
                out[k - 1] = article.upper() if shouting else match_case(article, t.words[k - 1][0])
    return out


def _apply(text: str, spans: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(spans, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _apply_words(t: ParsedText, edits: dict[int, str]) -> str:
    edits = _with_articles(t, edits)
    return _apply(t.text, [(t.words[k][1], t.words[k][2], new) for k, new in edits.items()])


def _drop_edit(t: ParsedText, k: int) -> tuple[int, int, str] | None:
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


def free_kinds(prompt: str, kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds of ``kinds`` that a free-text perturbation applies to ``prompt``, in their order."""
    t = ParsedText(prompt)
    return tuple(k for k in kinds if _free_options(t, k))


def free_perturb(prompt: str, kind: str, rng: np.random.Generator) -> Perturbation:
    """One ``kind`` perturbation of free text ``prompt`` by the word rules, deterministic in ``rng``."""
    t = ParsedText(prompt)
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
        text, detail = _apply_words(t, {k: match_case(new, t.words[k][0])}), f"color {w[k]}->{new}"
    elif kind == "replace" and category == "number":
        i, k, value = option
        old = w[k]
        new = str(value) if old.isdigit() else NUMBER_WORDS[value - 1]
        edits = {k: match_case(new, t.words[k][0])}
        head = t.nps[i].noun
        if (value >= 2) != t.plural(i):
            edits[head] = match_case(inflect(w[head], value >= 2), t.words[head][0])
        text, detail = _apply_words(t, edits), f"number {old}->{new}"
    elif kind == "replace" and category == "relation":
        s, e, g = option
        new = RELATION_GROUPS[g][0]
        old = " ".join(w[s:e])
        text = _apply(prompt, [(t.words[s][1], t.words[e - 1][2], match_case(new, t.words[s][0]))])
        detail = f"relation {old}->{new}"
    elif kind == "replace":
        i, noun = option
        head = t.nps[i].noun
        new = inflect(noun, t.plural(i))
        text, detail = _apply_words(t, {head: match_case(new, t.words[head][0])}), f"noun {w[head]}->{new}"
    elif kind == "swap" and category == "color":
        a, b = option
        edits = {a: match_case(w[b], t.words[a][0]), b: match_case(w[a], t.words[b][0])}
        text, detail = _apply_words(t, edits), f"color {w[a]}<->{w[b]}"
    elif kind == "swap":
        i, j = option
        a, b = t.nps[i].noun, t.nps[j].noun
        edits = {
            a: match_case(inflect(w[b], t.plural(i)), t.words[a][0]),
            b: match_case(inflect(w[a], t.plural(j)), t.words[b][0]),
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
