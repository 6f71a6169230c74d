"""The bounded-memory signatures (counts spilled to a temporary file, features built per block,
the p-space classifier, permuted labels as codes) give the in-memory results on small traces."""
from __future__ import annotations

import numpy as np
import pytest

import moescope
from moescope import chunked, inference as inf
from moescope.inference import ridge_pspace
from moescope.analysis import route_pass as rp, routing_counts as rc
from moescope.analysis.signatures import gather_signature_inputs, routing_signatures
from moescope.analysis.spilled_keys import SpilledCounts
from moescope.testing.synthetic import labelled_trace

RUN = dict(label="label", folds=3, repeats=2, permutations=9, control_draws=1, figures=False)


def force_bounded_memory(monkeypatch) -> None:
    """Every threshold at 0 (and tiny blocks), so the small trace takes every bounded path."""
    monkeypatch.setattr(chunked, "LAZY_CELLS", 0)
    monkeypatch.setattr(chunked, "BLOCK_ROWS", 13)
    monkeypatch.setattr(ridge_pspace, "PSPACE_MIN_CELLS", 0)
    monkeypatch.setattr(inf.ridge, "KEEP_PREDICTIONS_MAX", 0)  # read where ridge_cv runs
    monkeypatch.setattr(rc, "SPILL_SEQUENCE_CELLS", 0)
    monkeypatch.setattr(rc, "_SUM_ROWS", 7)
    monkeypatch.setattr(SpilledCounts, "REMAP_BYTES", 256)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "trace"
    labelled_trace(path, n_seq=96, seq_len=16, layers=3, biased_layers=(1,), strength=1.0, n_experts=8, top_k=2)
    return moescope.open_trace(path)


def _same(a: dict, b: dict) -> None:
    for key, value in a.items():
        if key == "notes":
            continue
        other = b[key]
        if isinstance(value, float) or (isinstance(value, np.ndarray) and value.dtype.kind == "f"):
            assert np.allclose(value, other, rtol=1e-9, atol=1e-12, equal_nan=True), key
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert np.allclose(value, other, rtol=1e-9, atol=1e-12, equal_nan=True), key
        else:
            assert np.array_equal(np.asarray(value), np.asarray(other)), key


@pytest.mark.parametrize("max_sequences", [None, 50])
def test_bounded_memory_path_equals_the_in_memory_path(trace, monkeypatch, max_sequences):
    direct = routing_signatures(trace, max_sequences=max_sequences, **RUN).values
    force_bounded_memory(monkeypatch)
    inputs = gather_signature_inputs(trace, "label", max_sequences=max_sequences)
    assert isinstance(inputs.seq_counts.counts, SpilledCounts)  # on disk, not in memory
    bounded = routing_signatures(trace, max_sequences=max_sequences, **RUN).values
    _same(direct, bounded)
    assert (bounded["n_sequences"] == 96) == (max_sequences is None)  # --max-sequences still samples
    assert direct["token_id_control_fitted_per_fold"] and direct["token_id_control_accuracy_mean"] is not None
    assert direct["cv_accuracy_mean"] > 0.6  # the planted layer is found on both paths


def test_spilled_counts_add_rows_in_any_order(monkeypatch):
    rng = np.random.default_rng(0)
    seq_ids, edges = np.arange(40), np.array([0, 1, 2, 4])
    chunks = [rp.Chunk((rng.integers(0, 40, 500) << 32) | rng.integers(0, 8, 500), rng.integers(0, 3, 500),
                       rng.integers(0, 9, (500, 2)), None) for _ in range(3)]  # expert 8 = padding
    monkeypatch.setattr(rp, "_SPAN", 50)  # many spans per chunk
    monkeypatch.setattr(SpilledCounts, "REMAP_BYTES", 100)
    dense = rp.SequenceCounter(seq_ids, np.zeros(40, np.int64), edges, 3, 8)
    spilled = rp.SequenceCounter(seq_ids, np.zeros(40, np.int64), edges, 3, 8, spill=True)
    for chunk in chunks:
        dense.add(chunk)
        spilled.add(chunk)
    assert np.array_equal(np.asarray(spilled.counts.finish()), dense.counts)
    keep = rng.random(40) < 0.5
    a = rc.SequenceCounts(seq_ids, dense.counts, dense.n_tokens, edges).select(keep)
    b = rc.SequenceCounts(seq_ids, spilled.counts, spilled.n_tokens, edges).select(keep)
    for got, want in ((b.total(), a.total()), (b.first(2), a.first(2))):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_token_id_control_of_a_wide_model_holds_4_bytes_per_cell():
    """A 48-layer, 128-expert model over a large vocabulary makes the control's (layer, token id,
    expert) table the biggest thing in memory: it is int32, the map sparse, and a fold adds one
    more int32 table, not float64 copies (8 layers x 20,000 ids x 128 experts: 82 MB a table;
    measured 2.6 tables at the peak, 7.0 before)."""
    import tracemalloc

    from scipy.sparse import csr_matrix

    from moescope.analysis.signature_controls import SequenceTokenExperts, TokenIdControl

    rng = np.random.default_rng(0)
    L, V, E, k, S, T = 8, 20_000, 128, 4, 40, 400
    tok = rng.integers(0, V, size=(S, T))
    experts = np.argsort(rng.random((S, T, L, E)), axis=3)[..., :k]  # k distinct experts
    layer = np.broadcast_to(np.arange(L)[None, None, :, None], experts.shape)
    key = ((layer * V + tok[:, :, None, None]) * E + experts).astype(np.int32)
    seq = np.broadcast_to(np.arange(S)[:, None, None, None], key.shape)
    ste = SequenceTokenExperts.from_rows(seq.ravel(), key.ravel(), None, np.arange(V), (L, V, E))
    occ = csr_matrix((np.ones(S * T), (np.repeat(np.arange(S), T), tok.ravel())), shape=(S, V))
    del experts, layer, key, seq
    tracemalloc.start()
    try:
        control = TokenIdControl(ste, occ, np.full((S, L), float(T)), k)
        features, unseen = control.fold(np.arange(30), np.arange(30, 40))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    table = L * V * E * 4
    assert control.total.dtype == np.int32 and all(m.nnz <= V * k for m in control.base_map)
    assert peak < 3 * table, f"peak {peak / 2**20:.0f} MiB for a {table / 2**20:.0f} MiB table"
    assert features.shape == (S, L * E) and 0 < unseen < 1
    assert np.allclose(features.reshape(S, L, E).sum(axis=2), k)  # k experts per token, every layer
