"""Signatures on a sample of sequences (--max-sequences): stratified by label, groups whole,
seeded; the counting pass keeps arrays of the sampled sequences only; a planted label effect
is still found on the sample."""
from __future__ import annotations

import numpy as np
import pytest

import moescope
from moescope.analysis.routing_counts import count_routes, sequence_token_counts
from moescope.analysis.sequence_sample import sample_sequences
from moescope.analysis.signatures import gather_signature_inputs
from moescope.testing.synthetic import labelled_trace


def population(n_groups: int = 300, seed: int = 0):
    """Sequences in groups of 1-4, one label per group, labels unbalanced (60/30/10 %)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_groups)
    group_label = rng.choice(["a", "b", "c"], n_groups, p=[0.6, 0.3, 0.1])
    groups = np.repeat(np.arange(n_groups), sizes).astype(str)
    labels = np.repeat(group_label, sizes)
    seq_ids = np.arange(len(groups)) * 3 + 7  # ids need not be 0..S-1
    return seq_ids, labels, groups


def test_the_sample_keeps_label_shares_and_whole_groups():
    seq_ids, labels, groups = population()
    pick = sample_sequences(seq_ids, labels, groups, 200, seed=1)
    chosen = np.isin(seq_ids, pick)
    assert abs(len(pick) - 200) <= 3 * 3  # at most one overshooting group (<= 3 extra) per label
    for name in ("a", "b", "c"):
        share = (labels[chosen] == name).mean()
        assert share == pytest.approx((labels == name).mean(), abs=0.03)
    for g in np.unique(groups[chosen]):  # a group is in the sample whole or not at all
        assert chosen[groups == g].all()


def test_the_sample_is_seeded_and_keeps_everything_when_small():
    seq_ids, labels, groups = population()
    a, b = sample_sequences(seq_ids, labels, groups, 150, seed=4), sample_sequences(seq_ids, labels, groups, 150, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_sequences(seq_ids, labels, groups, 150, seed=5))
    assert np.array_equal(sample_sequences(seq_ids, labels, None, 10_000), np.sort(seq_ids))
    rare = sample_sequences(seq_ids, labels, None, 5, seed=0)  # every label keeps 2 sequences at least
    assert set(labels[np.isin(seq_ids, rare)]) == {"a", "b", "c"}


def test_a_naive_cut_would_split_groups_the_sample_does_not():
    """The trap: a per-sequence random draw cuts groups in two."""
    seq_ids, labels, groups = population()
    naive = np.isin(seq_ids, np.random.default_rng(0).choice(seq_ids, 201, replace=False))
    assert any(0 < naive[groups == g].sum() < (groups == g).sum() for g in np.unique(groups))
    chosen = np.isin(seq_ids, sample_sequences(seq_ids, labels, groups, 201, seed=0))
    assert all(chosen[groups == g].all() or not chosen[groups == g].any() for g in np.unique(groups))


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "trace"
    labelled_trace(path, n_seq=120, seq_len=16, layers=3, biased_layers=(1,), strength=2.0, n_experts=8, top_k=2)
    return moescope.open_trace(path)


def test_counts_hold_the_sampled_sequences_only(trace):
    keep = np.array([3, 10, 11, 50, 119])
    whole = count_routes(trace, scan=False, sequences=True).sequences
    some = count_routes(trace, scan=False, sequences=True, sequence_ids=keep).sequences
    assert np.array_equal(some.seq_ids, keep) and some.counts.shape[0] == len(keep)
    assert np.array_equal(some.counts, whole.counts[np.isin(whole.seq_ids, keep)])
    tok = sequence_token_counts(trace, phase="prompt", seq_ids=keep)
    assert set(np.unique(tok["seq_id"])) == set(keep)


def test_signature_inputs_on_a_sample(trace):
    inputs = gather_signature_inputs(trace, "label", max_sequences=40, seed=3)
    n = len(inputs.labels)
    assert 40 <= n <= 44 and inputs.seq_counts.counts.shape[0] == n
    assert any("of 120 labelled sequences analysed" in note for note in inputs.notes)
    names, counts = np.unique(inputs.labels, return_counts=True)
    assert len(names) == 4 and counts.min() >= 8
    assert np.array_equal(np.unique(inputs.seq_token_experts.segment_seq), np.arange(n))
    full = gather_signature_inputs(trace, "label", max_sequences=1000)
    assert len(full.labels) == 120 and not any("labelled sequences analysed" in note for note in full.notes)


def test_a_planted_label_effect_is_found_on_a_sample(trace):
    from moescope.analysis.signatures import routing_signatures

    res = routing_signatures(trace, label="label", max_sequences=60, folds=3, repeats=1, permutations=19,
                             control_draws=1, figures=False)
    assert res.params["max_sequences"] == 60
    assert res.values["cv_accuracy_mean"] > 0.6  # 4 labels: chance 0.25; the biased layer separates them


def test_no_effect_on_a_sample_of_a_null_trace(tmp_path):
    from moescope.analysis.signatures import routing_signatures
    from moescope.testing.synthetic import null_trace

    null_trace(tmp_path / "null", n_seq=120, seq_len=16, layers=3, n_experts=8, top_k=2)
    res = routing_signatures(moescope.open_trace(tmp_path / "null"), label="label", max_sequences=60, folds=3,
                             repeats=1, permutations=19, control_draws=1, figures=False)
    assert res.values["cv_accuracy_mean"] < 0.45  # chance 0.25
