"""Probe data for the semantic routing study, built offline from WordNet 3.0.

Two kinds of probes, both with the target word's exact character span in each sentence:

* WiC-style sense pairs (``SensePair``): two WordNet example sentences that use the same
  lemma (same part of speech), labelled ``same`` when both examples belong to one synset and
  ``different`` otherwise. Sampling is balanced twice over: as many same- as different-sense
  pairs, and every lemma contributes one pair of each label per round, so the lemma itself
  cannot explain a same/different gap.
* Substitution items (``SubstitutionItem``): an example sentence with its target in base
  form, good substitutes (the other single-word lemmas of the target's synset) and as many
  controls (random single-word lemmas of the same part of speech that never share a synset
  with the target, drawn from the words WordNet's examples use, so they are ordinary
  vocabulary rather than rare taxonomic names).

Locating a lemma: the first whole-word, case-insensitive match of the lemma or one of its
inflections (regular English suffix rules plus WordNet's ``*.exc`` irregular forms) in the
example; examples where it cannot be found are dropped. Only lowercase alphabetic lemmas
(hyphens allowed inside) of 2+ letters are used, minus a short stoplist of closed-class
homographs ("a" is also a vitamin, "in" also an inch); multiword lemmas are left out.
Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np

from moescope.wordnet import DEFAULT_DIR, POS_FILES, iter_synsets, read_exceptions, require_wordnet

__all__ = [
    "Context", "SensePair", "SubstitutionItem", "Occurrence",
    "inflections", "find_target", "wordnet_occurrences", "wordnet_pairs", "wordnet_substitutions",
]

_LEMMA = re.compile(r"[a-z]+(?:-[a-z]+)*")
_STOP = frozenset(
    "a an the i in on at to of by as or and it if so no up he we us me my be is am do go"
    " ax ex id oh ok ow".split()
)
_VOWELS = frozenset("aeiou")
_WORD = re.compile(r"[\w-]+")


@dataclass(frozen=True)
class Context:
    """A sentence and the character span [start, end) of its target word."""

    text: str
    start: int
    end: int

    @property
    def word(self) -> str:
        """The target as written in the sentence."""
        return self.text[self.start : self.end]

    def replace(self, word: str) -> "Context":
        """The same sentence with the target replaced by `word` (capitalised like the target)."""
        if self.word[:1].isupper():
            word = word[:1].upper() + word[1:]
        return Context(self.text[: self.start] + word + self.text[self.end :], self.start, self.start + len(word))


@dataclass(frozen=True)
class Occurrence:
    """A WordNet example sentence and the synset lemma it uses."""

    lemma: str
    pos: str  # n, v, a (satellites included), r
    sense: str  # synset key such as 02086723-n
    context: Context


@dataclass(frozen=True)
class SensePair:
    """Two contexts of one lemma, in the same WordNet sense (label "same") or not ("different")."""

    item_id: str
    lemma: str
    pos: str
    label: str
    a: Context
    b: Context
    sense_a: str = ""
    sense_b: str = ""


@dataclass(frozen=True)
class SubstitutionItem:
    """A context, good substitutes of its target and control words of the same part of speech."""

    item_id: str
    lemma: str
    pos: str
    original: Context
    substitutes: tuple[str, ...]
    controls: tuple[str, ...]
    sense: str = ""


# -- locating a lemma in a sentence ------------------------------------------------------------
def _regular(lemma: str, pos: str) -> set[str]:
    """Regular English inflections of `lemma` (over-generation is harmless: forms must be found)."""
    forms = {lemma}
    last, stem = lemma[-1], lemma[:-1]
    consonant_y = last == "y" and len(lemma) > 1 and lemma[-2] not in _VOWELS
    # doubling for CVC endings (stop -> stopped, big -> bigger)
    cvc = len(lemma) > 2 and last not in _VOWELS | {"w", "x", "y"} and lemma[-2] in _VOWELS and lemma[-3] not in _VOWELS
    if pos in ("n", "v"):
        forms.add(lemma + "s")
        if lemma.endswith(("s", "x", "z", "ch", "sh", "o")):
            forms.add(lemma + "es")
        if consonant_y:
            forms.add(stem + "ies")
    if pos == "v":
        forms |= {lemma + "ed", lemma + "ing"}
        if last == "e":
            forms |= {lemma + "d", stem + "ing"}
        if lemma.endswith("ie"):
            forms.add(lemma[:-2] + "ying")
        if consonant_y:
            forms.add(stem + "ied")
        if cvc:
            forms |= {lemma + last + "ed", lemma + last + "ing"}
    if pos in ("a", "r"):
        forms |= {lemma + "er", lemma + "est"}
        if last == "e":
            forms |= {lemma + "r", lemma + "st"}
        if consonant_y:
            forms |= {stem + "ier", stem + "iest"}
        if cvc:
            forms |= {lemma + last + "er", lemma + last + "est"}
    return forms


def inflections(lemma: str, pos: str, exceptions: dict[str, list[str]] | None = None) -> list[str]:
    """The lemma and its inflected forms (regular rules + irregular `exceptions`), longest first."""
    irregular = {f for f in (exceptions or {}).get(lemma, []) if _LEMMA.fullmatch(f)}
    forms = _regular(lemma, pos) | irregular
    return sorted(forms, key=lambda f: (-len(f), f))


def find_target(sentence: str, forms: list[str] | set[str]) -> tuple[int, int] | None:
    """Character span [start, end) of the first whole-word match of any form, case-insensitive.

    A match must not touch a letter, digit, underscore or hyphen on either side ("dog's"
    matches "dog"; "well-known" does not match "well"). None when no form occurs. Forms
    are made of letters and inner hyphens, so a match is exactly a maximal ``[\\w-]+`` run.
    """
    wanted = {f.lower() for f in forms}
    for m in _WORD.finditer(sentence):
        if m.group().lower() in wanted:
            return m.start(), m.end()
    return None


def _usable(lemma: str) -> bool:
    return len(lemma) >= 2 and lemma not in _STOP and _LEMMA.fullmatch(lemma) is not None


# -- WordNet --------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _wordnet(root: str) -> tuple[tuple[Occurrence, ...], dict[str, tuple[tuple[str, ...], ...]]]:
    """(occurrences, lemma -> the usable lemmas of each of its synsets keyed by sense)."""
    base = require_wordnet(Path(root))
    occurrences: list[Occurrence] = []
    synonyms: dict[str, dict[str, tuple[str, ...]]] = defaultdict(dict)
    for letter, name in POS_FILES:
        exceptions = read_exceptions(base, name)
        forms_of: dict[str, set[str]] = {}
        for synset in iter_synsets(base, name):
            usable = tuple(dict.fromkeys(w for w in synset.lemmas if _usable(w)))
            for w in usable:
                synonyms[f"{w}.{letter}"][synset.key] = usable
            for sentence in synset.examples:
                for lemma in usable:  # the first lemma of the synset the example uses
                    if lemma not in forms_of:
                        forms_of[lemma] = set(inflections(lemma, letter, exceptions))
                    span = find_target(sentence, forms_of[lemma])
                    if span is not None:
                        occurrences.append(Occurrence(lemma, letter, synset.key, Context(sentence, *span)))
                        break
    return tuple(occurrences), {k: tuple(v.items()) for k, v in synonyms.items()}  # type: ignore[misc]


def wordnet_occurrences(root: Path = DEFAULT_DIR) -> list[Occurrence]:
    """Every WordNet example sentence whose synset lemma could be located, in file order."""
    return list(_wordnet(str(root))[0])


def wordnet_pairs(n_pairs: int, *, seed: int = 0, root: Path = DEFAULT_DIR) -> list[SensePair]:
    """Up to `n_pairs` WiC-style pairs, half same-sense and half different-sense.

    Lemmas with at least one same- and one different-sense candidate pair are visited in a
    seeded random order, round after round, each visit taking one pair of each label, so
    lemmas contribute equally to both labels. Pairs of identical sentences are never made
    (WordNet repeats some examples across synsets). Returns fewer pairs when WordNet runs out.
    """
    groups: dict[tuple[str, str], list[Occurrence]] = defaultdict(list)
    for occ in _wordnet(str(root))[0]:
        groups[(occ.lemma, occ.pos)].append(occ)
    rng = np.random.default_rng(seed)
    candidates = []
    for key in sorted(groups):
        same, diff = [], []
        for x, y in combinations(groups[key], 2):
            if x.context.text != y.context.text:
                (same if x.sense == y.sense else diff).append((x, y))
        if same and diff:
            candidates.append((key, [same[i] for i in rng.permutation(len(same))],
                               [diff[i] for i in rng.permutation(len(diff))]))
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    half = n_pairs // 2
    chosen: list[tuple[str, tuple[str, str], tuple[Occurrence, Occurrence]]] = []
    rounds = max((min(len(s), len(d)) for _, s, d in order), default=0)
    for round_ in range(rounds):
        for key, same, diff in order:
            if round_ < min(len(same), len(diff)) and len(chosen) < 2 * half:
                chosen += [("same", key, same[round_]), ("different", key, diff[round_])]
        if len(chosen) >= 2 * half:
            break
    return [
        SensePair(f"wic-{i:06d}", key[0], key[1], label, x.context, y.context, x.sense, y.sense)
        for i, (label, key, (x, y)) in enumerate(chosen)
    ]


def wordnet_substitutions(
    n_items: int, *, seed: int = 0, max_substitutes: int = 3, root: Path = DEFAULT_DIR
) -> list[SubstitutionItem]:
    """Up to `n_items` substitution items, at most one per lemma, in a seeded random order.

    Only examples whose target appears in base form qualify (so a substitute lemma fits
    grammatically). Each item gets up to `max_substitutes` synonyms and exactly as many
    controls: random usable lemmas of the same part of speech seen in WordNet's examples
    that share no synset with the target.
    """
    occurrences, synonyms = _wordnet(str(root))
    pools: dict[str, list[str]] = defaultdict(list)
    for occ in occurrences:
        pools[occ.pos].append(occ.lemma)
    pools = {pos: sorted(set(words)) for pos, words in pools.items()}
    rng = np.random.default_rng(seed)
    items: list[SubstitutionItem] = []
    seen: set[tuple[str, str]] = set()
    for i in rng.permutation(len(occurrences)):
        occ = occurrences[i]
        if len(items) >= n_items:
            break
        if (occ.lemma, occ.pos) in seen or occ.context.word.lower() != occ.lemma:
            continue
        senses = dict(synonyms[f"{occ.lemma}.{occ.pos}"])
        subs = tuple(w for w in senses[occ.sense] if w != occ.lemma)[:max_substitutes]
        if not subs:
            continue
        related = {w for words in senses.values() for w in words}
        pool = pools[occ.pos]
        controls: list[str] = []
        while len(controls) < len(subs):  # rejection sampling: the pool is thousands of words
            word = pool[int(rng.integers(len(pool)))]
            if word not in related and word not in controls:
                controls.append(word)
        seen.add((occ.lemma, occ.pos))
        items.append(SubstitutionItem(f"sub-{len(items):06d}", occ.lemma, occ.pos, occ.context, subs,
                                      tuple(controls), occ.sense))
    return items
