"""From a target word's character span to the token positions that carry it.

A token belongs to the target when its character span [char_start, char_end) overlaps the
target's [start, end) and is not empty. Overlap (rather than containment) is what makes
this work with either offset convention of byte-level BPE tokenizers: with
``trim_offsets=True`` the token "Ġbank" spans "bank", without it " bank" (the space
included); special tokens have empty spans and never match. Punctuation next to the word
is its own token and does not overlap.

Which of the target's tokens represent it (``subword``):
    first   the first token (default: in a causal model the first subword is the first
            position where the word's identity enters; later subwords also see it)
    last    the last token (the position that has read the whole word)
    mean    all of them, each weighted 1/n (the analysis averages their expert sets)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moescope.errors import TraceError

__all__ = ["SUBWORD_MODES", "align_targets"]

SUBWORD_MODES = ("first", "last", "mean")


def _np(table: pa.Table, name: str, dtype: type = np.int64) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)


def align_targets(tokens: pa.Table, contexts: pa.Table, subword: str = "first") -> pa.Table:
    """The target tokens of every context that could be aligned.

    Args:
        tokens: the trace's tokens table (seq_id, pos, token_id, char_start, char_end; a
            `phase` column, if present, restricts it to prompt tokens).
        contexts: one row per context: seq_id, target_start, target_end (character offsets
            into that sequence's text).
        subword: "first", "last" or "mean" (see the module docstring).

    Returns:
        A table (seq_id uint32, pos uint32, token_id uint32, weight float32) sorted by
        seq_id, pos; weights of a context sum to 1. Contexts whose span overlaps no token
        (e.g. cut off by truncation) are absent.
    """
    if subword not in SUBWORD_MODES:
        raise ValueError(f"subword must be one of {SUBWORD_MODES}, not {subword!r}")
    missing = [c for c in ("char_start", "char_end") if c not in tokens.column_names]
    if missing:
        raise TraceError("the trace's tokens table has no character offsets (char_start, char_end); capture it again")
    if "phase" in tokens.column_names:
        tokens = tokens.filter(pc.equal(tokens.column("phase"), "prompt"))
    seq, pos, tid = _np(tokens, "seq_id"), _np(tokens, "pos"), _np(tokens, "token_id")
    cs, ce = _np(tokens, "char_start"), _np(tokens, "char_end")
    if len(cs) and (cs < 0).all():
        raise TraceError(
            "the trace records no character offsets (-1 everywhere: a slow tokenizer?); capture with a fast tokenizer"
        )
    order = np.lexsort((pos, seq))
    seq, pos, tid, cs, ce = seq[order], pos[order], tid[order], cs[order], ce[order]

    c_seq = _np(contexts, "seq_id")
    c_start, c_end = _np(contexts, "target_start"), _np(contexts, "target_end")
    c_order = np.argsort(c_seq, kind="stable")
    c_seq, c_start, c_end = c_seq[c_order], c_start[c_order], c_end[c_order]
    if len(np.unique(c_seq)) != len(c_seq):
        raise ValueError("contexts must have one row per seq_id")
    # every token row -> its context (if any), then the overlap test, all vectorised
    idx = np.minimum(np.searchsorted(c_seq, seq), max(len(c_seq) - 1, 0))
    has_ctx = (c_seq[idx] == seq) if len(c_seq) else np.zeros(len(seq), bool)
    hit = has_ctx & (ce > cs) & (cs >= 0) & (cs < c_end[idx]) & (ce > c_start[idx])
    seq, pos, tid = seq[hit], pos[hit], tid[hit]

    if subword == "first":
        keep = np.unique(seq, return_index=True)[1]
    elif subword == "last":
        keep = len(seq) - 1 - np.unique(seq[::-1], return_index=True)[1]
    else:
        keep = np.arange(len(seq))
    seq, pos, tid = seq[keep], pos[keep], tid[keep]
    counts = np.unique(seq, return_counts=True)[1]
    weight = np.repeat(1.0 / counts, counts).astype(np.float32)
    return pa.table({
        "seq_id": pa.array(seq, pa.uint32()),
        "pos": pa.array(pos, pa.uint32()),
        "token_id": pa.array(tid, pa.uint32()),
        "weight": pa.array(weight, pa.float32()),
    })
