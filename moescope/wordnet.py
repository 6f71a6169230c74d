"""A small reader of the Princeton WordNet 3.0 database files (format: wndb(5WN), morph(7WN)).

Used by the training corpus (glosses as definition sentences) and by the semantic probes
(example sentences, senses, synonyms). It reads the ``data.<pos>`` files and the
``<pos>.exc`` inflection exceptions directly, so neither NLTK nor a download is needed.

    for synset in iter_synsets(DEFAULT_DIR, "noun"):
        synset.lemmas, synset.examples
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moescope.errors import DataError

__all__ = [
    "DEFAULT_DIR", "POS_FILES", "Synset", "gloss_definition", "gloss_examples",
    "parse_data_line", "iter_synsets", "read_exceptions", "require_wordnet",
]

DEFAULT_DIR = Path("/usr/share/wordnet")  # Debian package wordnet-base
# (pos letter of the file, file name suffix); adjective files also hold satellites ("s")
POS_FILES = (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv"))
_EXAMPLE = re.compile(r'"([^"]+)"')
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective syntactic markers such as "galore(ip)"


@dataclass(frozen=True)
class Synset:
    """One synset line of a data file.

    Attributes:
        offset: the 8-digit byte offset that identifies the synset within its file.
        pos: WordNet's part-of-speech letter (n, v, a, s, r).
        lemmas: the synset's words, underscores turned into spaces, markers removed.
        gloss: the raw gloss: definition, then quoted example sentences.
    """

    offset: str
    pos: str
    lemmas: tuple[str, ...]
    gloss: str

    @property
    def examples(self) -> list[str]:
        """The gloss's quoted example sentences, stripped, in order."""
        return gloss_examples(self.gloss)

    @property
    def key(self) -> str:
        """A unique id such as ``02086723-n`` (satellites count as ``a``, like NLTK's offsets)."""
        return f"{self.offset}-{'a' if self.pos == 's' else self.pos}"


def gloss_examples(gloss: str) -> list[str]:
    """Example sentences of a gloss: the double-quoted parts, stripped of outer spaces."""
    return [e.strip() for e in _EXAMPLE.findall(gloss)]


def gloss_definition(gloss: str) -> str:
    """The definition part of a gloss (before the first quoted example), without trailing ``;:,``."""
    return re.split(r';?\s*"', gloss, maxsplit=1)[0].strip().rstrip(";:, ")


def parse_data_line(line: str) -> Synset | None:
    """The synset on one data-file line; None for the licence header's lines."""
    if line.startswith("  ") or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    offset, pos, count = parts[0], parts[2], int(parts[3], 16)
    words = parts[4 : 4 + 2 * count : 2]  # word, lex_id, word, lex_id, ...
    lemmas = tuple(_MARKER.sub("", w).replace("_", " ") for w in words)
    return Synset(offset, pos, lemmas, gloss.strip())


def require_wordnet(root: Path) -> Path:
    """`root` if it holds the WordNet data files, else a DataError naming the fix."""
    root = Path(root)
    if not (root / "data.noun").is_file():
        raise DataError(
            f"WordNet 3.0 files are missing from {root}; install the Debian package wordnet-base "
            "(scripts/install.sh does) or pass --wordnet DIR"
        )
    return root


def iter_synsets(root: Path, name: str) -> Iterator[Synset]:
    """Synsets of ``data.<name>`` (name: noun, verb, adj, adv) in file (offset) order."""
    with (Path(root) / f"data.{name}").open(encoding="utf-8", errors="replace") as f:
        for line in f:
            synset = parse_data_line(line)
            if synset is not None:
                yield synset


def read_exceptions(root: Path, name: str) -> dict[str, list[str]]:
    """Irregular inflections of ``<name>.exc``: base form -> inflected forms (e.g. go -> went, gone).

    Returns an empty dict when the file is absent. Forms keep WordNet's underscores for
    multiword entries.
    """
    path = Path(root) / f"{name}.exc"
    out: dict[str, list[str]] = {}
    if not path.is_file():
        return out
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            for base in parts[1:]:
                out.setdefault(base, []).append(parts[0])
    return out
