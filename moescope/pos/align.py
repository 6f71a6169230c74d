"""Word tags -> subword tags, through character offsets.

A trace's tokens table gives each prompt token its character span ``[char_start, char_end)``
in its sequence's text; a :class:`~moescope.pos.tagging.TaggedText` gives each word its span
and tag. A token takes the tag of the first word its span overlaps (so every subword of a word
inherits the word's tag; a token straddling two words, e.g. ``Don`` over spaCy's ``Do`` +
``n't``, takes the first word's). Tokens that overlap no word get no tag and are left out of
the analysis: special tokens (BOS/EOS, empty spans), space-only tokens (byte-level BPE with
trim_offsets gives them an empty span), newlines, generated tokens (no offsets, -1).

With ``first_subword_only`` only the first token of each word keeps its tag.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from moescope.errors import DataError
from moescope.pos.tagging import TaggedText


def word_arrays(tagged: Sequence[TaggedText]) -> dict[str, np.ndarray]:
    """Flat word arrays over all texts: seq (index of the text), start, end, word (index in its text), upos."""
    counts = np.array([len(t.spans) for t in tagged], dtype=np.int64)
    spans = np.array([s for t in tagged for s in t.spans], dtype=np.int64).reshape(-1, 2)
    seq = np.repeat(np.arange(len(tagged), dtype=np.int64), counts)
    word = np.arange(len(seq), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    upos = np.array([u for t in tagged for u in t.upos], dtype=object)
    return {"seq": seq, "start": spans[:, 0], "end": spans[:, 1], "word": word, "upos": upos}


def match_words(seq_id: np.ndarray, char_start: np.ndarray, char_end: np.ndarray,
                words: dict[str, np.ndarray]) -> np.ndarray:
    """For each token, the index into `words` of the first word its span overlaps; -1 when none.

    Words must be in text order and non-overlapping within each text (both taggers guarantee
    it). Vectorised: texts are laid end to end on one axis with a gap, so one searchsorted
    over word ends finds, for every token, the first word ending after the token starts.
    """
    seq_id = np.asarray(seq_id, dtype=np.int64)
    cs, ce = np.asarray(char_start, dtype=np.int64), np.asarray(char_end, dtype=np.int64)
    result = np.full(len(seq_id), -1, dtype=np.int64)
    if not len(words["seq"]) or not len(seq_id):
        return result
    stride = int(max(ce.max(initial=0), words["end"].max(initial=0))) + 2
    w_start = words["seq"] * stride + words["start"]
    w_end = words["seq"] * stride + words["end"]
    if np.any(np.diff(w_start) < 0) or np.any(w_start[1:] < w_end[:-1]):
        raise DataError("word spans overlap or are out of order; the tagged input is inconsistent")
    valid = (cs >= 0) & (ce > cs) & (seq_id >= 0) & (seq_id <= words["seq"].max(initial=-1))
    t_start, t_end = seq_id * stride + cs, seq_id * stride + ce
    idx = np.searchsorted(w_end, t_start, side="right")  # first word with end > token start
    ok = valid & (idx < len(w_end))
    hit = np.nonzero(ok)[0]
    hit = hit[w_start[idx[hit]] < t_end[hit]]  # ... that also starts before the token ends
    result[hit] = idx[hit]
    return result


def first_subword_mask(seq_id: np.ndarray, pos: np.ndarray, word: np.ndarray) -> np.ndarray:
    """True for tokens that are the first (lowest pos) token of their word; False for untagged (-1) tokens."""
    seq_id, pos, word = (np.asarray(a, dtype=np.int64) for a in (seq_id, pos, word))
    mask = np.zeros(len(seq_id), dtype=bool)
    tagged = np.nonzero(word >= 0)[0]
    if not len(tagged):
        return mask
    order = tagged[np.lexsort((pos[tagged], word[tagged], seq_id[tagged]))]
    key_seq, key_word = seq_id[order], word[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (key_seq[1:] != key_seq[:-1]) | (key_word[1:] != key_word[:-1])
    mask[order[new]] = True
    return mask


def tag_tokens(tokens: pa.Table, tagged: Sequence[TaggedText], *, first_subword_only: bool = False) -> pa.Table:
    """`tokens` (seq_id = index into `tagged`) with two columns added or replaced.

    Returns the table with ``upos`` (string; null for tokens overlapping no word, and with
    `first_subword_only` for non-first subwords) and ``word`` (int32: index of the word in its
    text, -1 when none). Needs the char_start / char_end columns a capture writes.
    """
    missing = [c for c in ("seq_id", "pos", "char_start", "char_end") if c not in tokens.column_names]
    if missing:
        raise DataError(f"the tokens table lacks {', '.join(missing)}: subwords cannot be aligned to words")
    seq_id = tokens.column("seq_id").to_numpy()
    words = word_arrays(tagged)
    idx = match_words(seq_id, tokens.column("char_start").to_numpy(), tokens.column("char_end").to_numpy(), words)
    word = np.where(idx >= 0, words["word"][np.maximum(idx, 0)], -1) if len(words["word"]) else np.full(len(idx), -1)
    keep = idx >= 0
    if first_subword_only:
        keep &= first_subword_mask(seq_id, tokens.column("pos").to_numpy(), word)
    upos = np.where(keep, words["upos"][np.maximum(idx, 0)] if len(words["upos"]) else None, None)
    for name, column in (("upos", pa.array(upos.tolist(), pa.string())), ("word", pa.array(word, pa.int32()))):
        if name in tokens.column_names:
            tokens = tokens.drop_columns([name])
        tokens = tokens.append_column(name, column)
    return tokens
