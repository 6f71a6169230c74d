"""Target alignment: character span -> token positions through a byte-level BPE's offsets."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import build_tokenizer
from tokenizers import processors

from moescope.errors import TraceError
from moescope.semantic.align import align_targets

# (text, target word); the target's span is its first occurrence
CASES = [
    ("The xylophone, rang.", "xylophone"),  # several subwords, comma right after
    ("xylophones are loud", "xylophones"),  # sentence start: no leading space
    ('He said "quick!" twice', "quick"),  # quotes and punctuation around it
    ("a  jujube\tjujube", "jujube"),  # two spaces before it, a tab after, a repeat
]


@pytest.fixture(scope="module", params=["untrimmed", "trimmed"])
def tokenizer(request, tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    if request.param == "trimmed":  # the project's tokenizer: "Ġword" spans "word" only
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return tok


def _tables(tokenizer, cases):
    """(tokens, contexts, per-sequence token strings) as a capture would record them."""
    rows, contexts, strings = [], [], []
    for seq_id, (text, word) in enumerate(cases):
        enc = tokenizer(text, return_offsets_mapping=True)
        strings.append(tokenizer.convert_ids_to_tokens(enc["input_ids"]))
        for pos, (tid, (s, e)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            rows.append((seq_id, pos, tid, s, e))
        start = text.index(word)
        contexts.append((seq_id, start, start + len(word)))
    r, c = np.array(rows), np.array(contexts)
    tokens = pa.table({"seq_id": pa.array(r[:, 0], pa.uint32()), "pos": pa.array(r[:, 1], pa.uint32()),
                       "token_id": pa.array(r[:, 2], pa.uint32()), "phase": ["prompt"] * len(r),
                       "char_start": pa.array(r[:, 3], pa.int32()), "char_end": pa.array(r[:, 4], pa.int32())})
    ctx = pa.table({"seq_id": pa.array(c[:, 0], pa.uint32()), "target_start": c[:, 1], "target_end": c[:, 2]})
    return tokens, ctx, strings


def _decoded(tokenizer, strings, seq_id, positions):
    return tokenizer.convert_tokens_to_string([strings[seq_id][p] for p in positions]).strip()


def test_first_last_mean_cover_exactly_the_word(tokenizer):
    tokens, ctx, strings = _tables(tokenizer, CASES)
    mean = align_targets(tokens, ctx, "mean")
    first = align_targets(tokens, ctx, "first")
    last = align_targets(tokens, ctx, "last")
    for seq_id, (_, word) in enumerate(CASES):
        sel = np.asarray(mean.column("seq_id")) == seq_id
        positions = np.asarray(mean.column("pos"))[sel].tolist()
        assert len(positions) >= 2, "the test words must split into several subwords"
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert _decoded(tokenizer, strings, seq_id, positions) == word  # no space-only token, no punctuation
        np.testing.assert_allclose(np.asarray(mean.column("weight"))[sel], 1 / len(positions))
        assert first.column("pos")[seq_id].as_py() == positions[0]
        assert last.column("pos")[seq_id].as_py() == positions[-1]
        assert first.column("weight")[seq_id].as_py() == 1.0
    # token ids come along (the token-identity control compares them)
    assert first.column("token_id").to_pylist() == [
        tokens.column("token_id")[int(np.nonzero((np.asarray(tokens.column("seq_id")) == s)
                                                 & (np.asarray(tokens.column("pos")) == p))[0][0])].as_py()
        for s, p in zip(first.column("seq_id").to_pylist(), first.column("pos").to_pylist())]


def test_special_tokens_truncation_and_generated_tokens():
    # pos 0 is a BOS with an empty (0, 0) span; seq 1 was truncated before its target;
    # a generated token with an overlapping span must not count
    tokens = pa.table({"seq_id": pa.array([0, 0, 0, 1, 1], pa.uint32()), "pos": pa.array([0, 1, 2, 0, 1], pa.uint32()),
                       "token_id": pa.array([0, 7, 8, 0, 7], pa.uint32()),
                       "phase": ["prompt", "prompt", "generated", "prompt", "prompt"],
                       "char_start": pa.array([0, 0, 0, 0, 0], pa.int32()), "char_end": pa.array([0, 4, 4, 0, 4], pa.int32())})
    ctx = pa.table({"seq_id": pa.array([0, 1], pa.uint32()), "target_start": [0, 10], "target_end": [4, 14]})
    out = align_targets(tokens, ctx, "mean")
    assert out.column("seq_id").to_pylist() == [0] and out.column("pos").to_pylist() == [1]


def test_refuses_traces_without_offsets():
    tokens = pa.table({"seq_id": pa.array([0], pa.uint32()), "pos": pa.array([0], pa.uint32()),
                       "token_id": pa.array([3], pa.uint32()), "char_start": pa.array([-1], pa.int32()),
                       "char_end": pa.array([-1], pa.int32())})
    ctx = pa.table({"seq_id": pa.array([0], pa.uint32()), "target_start": [0], "target_end": [3]})
    with pytest.raises(TraceError, match="character offsets"):
        align_targets(tokens, ctx)
    with pytest.raises(ValueError, match="subword"):
        align_targets(tokens, ctx, "middle")
