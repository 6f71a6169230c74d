"""WordNet 3.0 synsets as short definition sentences (the corpus's ``definitions`` domain).

Reads the ``data.<pos>`` files of the Princeton database directly (format: wndb(5WN)), so
no NLTK or network download is involved.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["SYNSETS_PER_DOC", "read_wordnet", "synset_sentence"]

SYNSETS_PER_DOC = 20
_POS_FILES = (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv"))
_DETERMINERS = frozenset("a an the any one some an all each every".split())


def _article(word: str) -> str:
    return "An" if word[0].lower() in "aeiou" else "A"


def synset_sentence(pos: str, lemmas: list[str], gloss: str) -> str:
    """Render one synset: "A dog is a member of the genus Canis ...; Synonyms: ... Example: ...".

    ``pos`` is WordNet's part-of-speech letter (n, v, a, s, r), ``lemmas`` the synset's words
    with spaces (not underscores) and ``gloss`` the raw gloss with its quoted examples.
    Returns one line of text.
    """
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = re.split(r';?\s*"', gloss, maxsplit=1)[0].strip().rstrip(";:, ")
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
    if examples:
        sentence += " Example: " + "; ".join(f'"{e.strip()}"' for e in examples) + "."
    return sentence


def _parse_line(line: str) -> tuple[str, str, list[str], str] | None:
    """(offset, pos, lemmas, gloss) of one data-file line, None for the licence header."""
    if line.startswith("  ") or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    offset, pos, count = parts[0], parts[2], int(parts[3], 16)
    words = parts[4 : 4 + 2 * count : 2]
    # adjectives may carry a syntactic marker such as "galore(ip)"
    lemmas = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]
    return offset, pos, lemmas, gloss.strip()


def read_wordnet(root: Path) -> list[tuple[str, str, str]]:
    """``(doc_id, source, text)`` for documents of ``SYNSETS_PER_DOC`` consecutive synsets.

    Files are read nouns, verbs, adjectives, adverbs, each in offset order; every line of a
    document is one synset's sentence.
    """
    docs: list[tuple[str, str, str]] = []
    for _, name in _POS_FILES:
        path = root / f"data.{name}"
        entries = []
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                parsed = _parse_line(line)
                if parsed is not None:
                    entries.append(parsed)
        for start in range(0, len(entries), SYNSETS_PER_DOC):
            chunk = entries[start : start + SYNSETS_PER_DOC]
            text = "\n".join(synset_sentence(pos, lemmas, gloss) for _, pos, lemmas, gloss in chunk)
            doc_id = f"definitions:{name}.{chunk[0][0]}"
            docs.append((doc_id, f"wordnet-3.0:data.{name}", text))
    return docs
