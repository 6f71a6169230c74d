"""Word tags -> subword tags through character offsets: multi-subword words, punctuation, spaces, specials."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import build_tokenizer
from moescope.pos.align import first_subword_mask, tag_tokens
from moescope.pos.tagging import TaggedText

TEXT = "The lighthouse keeper's  Nile, 84 times."
WORDS = [("The", "DET"), ("lighthouse", "NOUN"), ("keeper", "NOUN"), ("'s", "PART"), ("Nile", "PROPN"),
         (",", "PUNCT"), ("84", "NUM"), ("times", "NOUN"), (".", "PUNCT")]


def _tagged(text: str, words: list[tuple[str, str]]) -> TaggedText:
    spans, at = [], 0
    for form, _ in words:
        start = text.index(form, at)
        spans.append((start, start + len(form)))
        at = start + len(form)
    return TaggedText(text, tuple(spans), tuple(t for _, t in words), tuple(f for f, _ in words))


def _tokens(rows: list[tuple[int, int, int, int]]) -> pa.Table:
    """tokens table from (seq_id, pos, char_start, char_end) rows."""
    seq, pos, cs, ce = (list(c) for c in zip(*rows))
    return pa.table({"seq_id": pa.array(seq, pa.uint32()), "pos": pa.array(pos, pa.uint32()),
                     "token_id": pa.array(range(len(rows)), pa.uint32()), "char_start": pa.array(cs, pa.int32()),
                     "char_end": pa.array(ce, pa.int32())})


@pytest.fixture(scope="module", params=[False, True], ids=["untrimmed", "trim_offsets"])
def tokenizer(request, tmp_path_factory):
    from tokenizers import processors

    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    if request.param:  # the project's tokenizer: a token 'Ġword' spans 'word' without the space
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return tok


def test_real_tokenizer_subwords_inherit_their_word(tokenizer):
    tagged = _tagged(TEXT, WORDS)
    enc = tokenizer(TEXT, return_offsets_mapping=True)
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    rows = [(0, i, a, b) for i, (a, b) in enumerate(enc["offset_mapping"])]
    out = tag_tokens(_tokens(rows), [tagged])
    upos, word = out.column("upos").to_pylist(), out.column("word").to_pylist()
    lighthouse = [i for i, (_, _, a, b) in enumerate(rows) if 4 <= a < 14 or (a == 3 and b > 4)]
    assert len(lighthouse) >= 3 and all(upos[i] == "NOUN" and word[i] == 1 for i in lighthouse)  # multi-subword word
    for i, (_, _, a, b) in enumerate(rows):
        if not TEXT[a:b].strip():
            assert upos[i] is None and word[i] == -1, pieces[i]  # space-only tokens belong to no word
        else:
            hits = [w for w, (s, e) in enumerate(tagged.spans) if max(a, s) < min(b, e)]
            assert word[i] == hits[0] and upos[i] == WORDS[hits[0]][1], pieces[i]
    assert {upos[i] for i, (_, _, a, b) in enumerate(rows) if TEXT[a:b].strip() in (",", ".")} == {"PUNCT"}
    assert "NUM" in upos and "PART" in upos and "PROPN" in upos
    first = tag_tokens(_tokens(rows), [tagged], first_subword_only=True).column("upos").to_pylist()
    assert sum(u is not None for u in first) == len(WORDS)  # one token per word keeps its tag
    assert [first[i] for i in lighthouse] == ["NOUN"] + [None] * (len(lighthouse) - 1)


def test_specials_straddling_generated_and_other_sequences():
    a = _tagged("Don't go", [("Do", "AUX"), ("n't", "PART"), ("go", "VERB")])
    b = _tagged("Hi there", [("Hi", "INTJ"), ("there", "ADV")])
    rows = [(0, 0, 0, 0),    # BOS: empty span
            (0, 1, 0, 3),    # 'Don' straddles Do + n't: the first word wins
            (0, 2, 3, 5),    # "'t": inside n't
            (0, 3, 5, 6),    # the space
            (0, 4, 6, 8),    # go
            (0, 5, -1, -1),  # a generated token: no offsets
            (1, 0, 0, 2), (1, 1, 2, 8),  # second text: spans count from its own start
            (2, 0, 0, 3)]    # a sequence without words
    out = tag_tokens(_tokens(rows), [a, b, TaggedText("   ", (), ())])
    assert out.column("upos").to_pylist() == [None, "AUX", "PART", None, "VERB", None, "INTJ", "ADV", None]
    assert out.column("word").to_pylist() == [-1, 0, 1, -1, 2, -1, 0, 1, -1]
    again = tag_tokens(out, [a, b, TaggedText("   ", (), ())])  # re-tagging replaces the columns
    assert again.column_names.count("upos") == 1


def test_first_subword_mask_ignores_row_order():
    seq = np.array([1, 0, 0, 0, 1, 0])
    pos = np.array([1, 2, 0, 1, 0, 3])
    word = np.array([0, 1, 0, 0, 0, -1])
    assert first_subword_mask(seq, pos, word).tolist() == [False, True, True, False, True, False]


def test_alignment_needs_offsets():
    from moescope.errors import DataError

    with pytest.raises(DataError, match="char_start"):
        tag_tokens(pa.table({"seq_id": [0], "pos": [0]}), [])
