"""Tagged input -> tagged trace -> analysis input: the steps `moescope analyze pos` wires together.

    tagged, source = tagged_input(conllu="en_ewt-ud-test.conllu")    # or data=..., or the sample
    trace_dir, coverage = capture_tagged(model, tokenizer, tagged, Path("out"), run=RunOptions(),
                                         tag_source=source)
    tokens, routes, trace = load_tagged(trace_dir, first_subword_only=False)

A tagged trace is an ordinary trace whose tokens table has two more columns: ``upos`` (the
tag of the word the token belongs to, null when it belongs to none) and ``word`` (int32, the
word's index in its text, -1 when none; lets --first-subword-only work on a stored trace).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moescope.errors import DataError, MoescopeError, TraceError
from moescope.pos.align import first_subword_mask, tag_tokens
from moescope.pos.tagging import TaggedText, load_spacy, read_conllu, spacy_tag_source, tag_texts

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "pos" / "sample.conllu"
SAMPLE_TAG_SOURCE = ("built-in sample (KJV, Shakespeare, Python tutorial; 300 sentences), silver tags from "
                     "spaCy 3.8 en_core_web_sm 3.8.0")


def tagged_input(*, conllu: str | Path | None = None, data: str | Path | None = None, spacy_model: str | None = None,
                 mwt: str = "first", text_field: str = "text") -> tuple[list[TaggedText], str]:
    """(tagged texts, a one-line description of where the tags come from).

    `conllu`: gold tags from a CoNLL-U file; `data`: texts (.txt / .jsonl / .parquet) tagged
    with spaCy; neither: the built-in sample (moescope/data/pos/sample.conllu).
    """
    if conllu is not None and data is not None:
        raise MoescopeError("pass --conllu (tagged sentences) or --data (texts to tag with spaCy), not both")
    if conllu is not None:
        return read_conllu(conllu, mwt=mwt), f"CoNLL-U file {Path(conllu).name} (tags as given there)"
    if data is not None:
        from moescope.capture.data import TextDataset

        dataset = TextDataset(data, text_field=text_field, skip_empty=True)
        records = [r for r in dataset.iter_from(0) if r.text.strip()]
        nlp = load_spacy(spacy_model)
        metas = [{k: v for k, v in r.metadata.items() if isinstance(v, (str, int, float, bool))} for r in records]
        return tag_texts([r.text for r in records], nlp, metas=metas), spacy_tag_source(nlp)
    return read_conllu(SAMPLE), SAMPLE_TAG_SOURCE


def write_jsonl(tagged: Sequence[TaggedText], path: Path) -> Path:
    """The texts as a .jsonl capture input (`text` + metadata); line i becomes seq_id i."""
    with open(path, "w", encoding="utf-8") as f:
        for t in tagged:
            record = {**{k: v for k, v in t.meta.items() if k != "text"}, "text": t.text}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def capture_tagged(model: Any, tokenizer: Any, tagged: Sequence[TaggedText], out: Path, *, run: Any,
                   tag_source: str, model_name: str | None = None,
                   progress: Callable[[int, int, int], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Capture the texts into OUT/trace with tagged tokens; returns (trace dir, alignment coverage).

    The capture runs into OUT/.capture (resumable: the same call continues an interrupted
    run), then OUT/trace is written from it with the tokens table tagged, and .capture removed.
    Coverage: tokens, tagged tokens, words, and words that got at least one token.
    """
    from moescope.capture.dataset import capture_dataset
    from moescope.store.reader import open_trace
    from moescope.store.tables import write_trace

    out.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(tagged, out / "input.jsonl")
    raw = out / ".capture"
    try:
        manifest = capture_dataset(model, tokenizer, source, raw, run=run, model_name=model_name, progress=progress)
    except TraceError:  # a leftover of another input or model in our private directory: start afresh
        manifest = capture_dataset(model, tokenizer, source, raw, run=run, model_name=model_name, progress=progress,
                                   overwrite=True)
    captured = open_trace(raw)
    tokens = tag_tokens(captured.table("tokens"), tagged)
    coverage = alignment_coverage(tokens, tagged)
    if coverage["tagged_tokens"] == 0:
        raise DataError("no token could be aligned to a word: the tokenizer gives no character offsets "
                        "(use a model with a fast tokenizer), or the texts are empty")
    capture_info = {**captured.manifest.get("capture", {}), "tokenizer": manifest.get("tokenizer"),
                    "input": manifest.get("input"), "tags": tag_source}
    write_trace(out / "trace", routes=captured.table("routes"), tokens=tokens, sequences=captured.table("sequences"),
                model=captured.model, capture=capture_info, overwrite=True)
    shutil.rmtree(raw)
    return out / "trace", coverage


def alignment_coverage(tokens: pa.Table, tagged: Sequence[TaggedText]) -> dict[str, int]:
    """How much of the text the tags reached: tokens, tagged_tokens, words, words_with_tokens.

    Words without tokens are those cut by --max-length truncation (or merged into a token
    that starts in the word before)."""
    word = tokens.column("word").to_numpy()
    seq = tokens.column("seq_id").to_numpy().astype(np.int64)
    hit = word >= 0
    covered = len(np.unique(seq[hit] * (1 << 32) + word[hit]))
    return {"tokens": tokens.num_rows, "tagged_tokens": int(hit.sum()), "words": sum(len(t.upos) for t in tagged),
            "words_with_tokens": int(covered)}


def load_tagged(path: str | Path, *, first_subword_only: bool = False) -> tuple[pa.Table, pa.Table, Any]:
    """(tokens with upos, routes, Trace) of a tagged trace; with `first_subword_only` the tags of
    non-first subwords are nulled (needs the ``word`` column moescope writes)."""
    from moescope.store.reader import open_trace

    trace = open_trace(path)
    columns = trace.columns("tokens") if trace.has("tokens") else []
    if "upos" not in columns:
        raise DataError(f"{path}: its tokens table has no upos column; run `moescope analyze pos --conllu FILE` "
                        "or `--data FILE` to capture a tagged trace, or add the column with your own tagger")
    tokens = trace.table("tokens", columns=[c for c in ("seq_id", "pos", "token_id", "upos", "word") if c in columns])
    if first_subword_only:
        if "word" not in columns:
            raise DataError(f"{path}: its tokens table has no word column, so first subwords are unknown; "
                            "drop --first-subword-only or retag the text with `moescope analyze pos`")
        first = first_subword_mask(tokens.column("seq_id").to_numpy(), tokens.column("pos").to_numpy(),
                                   tokens.column("word").to_numpy())
        upos = pc.if_else(pa.array(first), tokens.column("upos"), pa.scalar(None, pa.string()))
        tokens = tokens.set_column(tokens.column_names.index("upos"), "upos", upos)
    routes = trace.table("routes", columns=["seq_id", "pos", "layer", "experts"])
    return tokens, routes, trace
