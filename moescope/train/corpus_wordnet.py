"""WordNet 3.0 synsets as short definition sentences (the corpus's ``definitions`` domain).

Reads the ``data.<pos>`` files of the Princeton database directly (format: wndb(5WN)) with
the shared reader in ``moescope.wordnet``, so no NLTK or network download is involved.
"""
from __future__ import annotations

from pathlib import Path

from moescope.wordnet import POS_FILES, gloss_definition, iter_synsets

__all__ = ["SYNSETS_PER_DOC", "read_wordnet", "synset_sentence"]

SYNSETS_PER_DOC = 20
_DETERMINERS = frozenset("a an the any one some an all each every".split())


def _article(word: str) -> str:
    return "An" if word[0].lower() in "aeiou" else "A"


def synset_sentence(pos: str, lemmas: list[str], gloss: str) -> str:
    """Render one synset: "A dog is a member of the genus Canis ... Synonyms: ...".

    ``pos`` is WordNet's part-of-speech letter (n, v, a, s, r), ``lemmas`` the synset's words
    with spaces (not underscores) and ``gloss`` the raw gloss. The gloss's quoted example
    sentences are left out on purpose: they are the semantic-routing probes
    (moescope.semantic.probes), which the built-in model must not have seen in training.
    Returns one line of text.
    """
    definition = gloss_definition(gloss)
    word = lemmas[0]
    if pos == "n":
        first = definition.split(" ", 1)[0].lower()
        if word[0].isupper() or first not in _DETERMINERS:  # names and mass nouns: no article
            sentence = f"{word[0].upper()}{word[1:]} is {definition}."
        else:
            sentence = f"{_article(word)} {word} is {definition}."
    elif pos == "v":
        sentence = f"To {word} is to {definition}."
    else:  # adjectives (a, s) and adverbs (r)
        sentence = f"{word[0].upper()}{word[1:]} means {definition}."
    if len(lemmas) > 1:
        sentence += " Synonyms: " + ", ".join(lemmas[1:]) + "."
    return sentence


def read_wordnet(root: Path) -> list[tuple[str, str, str]]:
    """``(doc_id, source, text)`` for documents of ``SYNSETS_PER_DOC`` consecutive synsets.

    Files are read nouns, verbs, adjectives, adverbs, each in offset order; every line of a
    document is one synset's sentence.
    """
    docs: list[tuple[str, str, str]] = []
    for _, name in POS_FILES:
        entries = list(iter_synsets(root, name))
        for start in range(0, len(entries), SYNSETS_PER_DOC):
            chunk = entries[start : start + SYNSETS_PER_DOC]
            text = "\n".join(synset_sentence(s.pos, list(s.lemmas), s.gloss) for s in chunk)
            doc_id = f"definitions:{name}.{chunk[0].offset}"
            docs.append((doc_id, f"wordnet-3.0:data.{name}", text))
    return docs
