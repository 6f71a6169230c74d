"""Known-answer tests of task routing signatures (moescope/analysis/signatures.py)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

import moescope
from moescope.analysis.signature_controls import load_balanced_counts
from moescope.analysis.signatures import cosine_stats, routing_signatures
from moescope.errors import DataError
from moescope.store.tables import write_trace
from moescope.testing.synthetic import labelled_trace, null_trace, token_routed_trace

FAST = dict(permutations=20, control_draws=2, figures=False)
REQUIRED = ("within_cosine_mean", "within_cosine_sd", "across_cosine_mean", "across_cosine_sd", "cohens_d",
            "cv_accuracy_mean", "cv_accuracy_sd", "macro_f1", "permutation_accuracy_mean", "permutation_p_value",
            "load_balanced_accuracy_mean", "bag_of_tokens_accuracy_mean", "token_id_control_accuracy_mean",
            "per_layer_accuracy")


def _run(path, **kw):
    return routing_signatures(moescope.open_trace(path), label="label", **{**FAST, **kw}).values


def test_planted_layers_are_found_and_only_those(tmp_path):
    v = _run(labelled_trace(tmp_path / "t", layers=5, biased_layers=(1, 3), strength=1.0))
    assert all(v[key] is not None for key in REQUIRED)
    acc = v["per_layer_accuracy"]
    assert len(acc) == 5
    assert acc[1] >= 0.85 and acc[3] >= 0.85
    assert max(acc[0], acc[2], acc[4]) <= 0.5  # chance is 0.25
    assert v["cv_accuracy_mean"] >= 0.9 and v["macro_f1"] >= 0.9
    assert v["permutation_accuracy_mean"] < 0.4 and v["permutation_p_value"] == pytest.approx(1 / 21)
    assert v["load_balanced_accuracy_mean"] < 0.45 and abs(v["load_balanced_cohens_d"]) < 0.3
    assert v["cohens_d"] > 1.0 and v["within_cosine_mean"] > v["across_cosine_mean"]
    assert v["best_layer"] in (1, 3)
    # more tokens seen, more separable
    assert v["first_n_accuracy"][0] < v["first_n_accuracy"][-1]
    assert np.asarray(v["confusion_matrix"]).sum() == v["n_sequences"] == 80


def test_null_trace_is_at_chance(tmp_path):
    v = _run(null_trace(tmp_path / "t", layers=3))
    assert v["cv_accuracy_mean"] <= 0.45
    assert v["permutation_p_value"] >= 0.1
    assert max(v["per_layer_accuracy"]) <= 0.5
    assert abs(v["cohens_d"]) < 0.3
    assert v["bag_of_tokens_accuracy_mean"] <= 0.45 and v["token_id_control_accuracy_mean"] <= 0.45


def test_token_id_control_explains_pure_token_routing(tmp_path):
    # routing is a function of the token id; labels differ only in their vocabulary
    v = _run(token_routed_trace(tmp_path / "t", layers=3))
    assert v["cv_accuracy_mean"] >= 0.7
    assert abs(v["adds_over_token_id_control"]) <= 0.1
    assert v["bag_of_tokens_accuracy_mean"] >= 0.9


def test_token_id_control_falls_short_of_label_routing(tmp_path):
    # routing depends on the token id AND, beyond it, on the label (same vocabulary for all labels)
    v = _run(labelled_trace(tmp_path / "t", layers=3, token_strength=1.0, biased_layers=(1, 2)))
    assert v["cv_accuracy_mean"] >= 0.9
    assert v["adds_over_token_id_control"] >= 0.3
    assert v["adds_over_bag_of_tokens"] >= 0.5


def test_cosine_stats_match_brute_force():
    rng = np.random.default_rng(0)
    X, y = rng.random((30, 12)), np.repeat(["a", "b", "c"], 10)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    cos = U @ U.T
    iu = np.triu_indices(30, 1)
    same = (y[:, None] == y[None, :])[iu]
    within, across = cos[iu][same], cos[iu][~same]
    s = cosine_stats(X, y)
    assert s["within_cosine_mean"] == pytest.approx(within.mean()) and s["within_cosine_sd"] == pytest.approx(within.std(ddof=1))
    assert s["across_cosine_mean"] == pytest.approx(across.mean()) and s["across_cosine_sd"] == pytest.approx(across.std(ddof=1))
    pooled = np.sqrt(((len(within) - 1) * within.var(ddof=1) + (len(across) - 1) * across.var(ddof=1))
                     / (len(within) + len(across) - 2))
    assert s["cohens_d"] == pytest.approx((within.mean() - across.mean()) / pooled)


def test_load_balanced_control_keeps_both_margins():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 20, size=(12, 3, 8))
    drawn = load_balanced_counts(counts, np.random.default_rng(2))
    assert np.array_equal(drawn.sum(axis=0), counts.sum(axis=0))  # each expert's total per layer
    assert np.array_equal(drawn.sum(axis=2), counts.sum(axis=2))  # each sequence's assignments per layer
    assert not np.array_equal(drawn, counts)


def _routes_only(path, labels, *, with_tokens=False):
    """A trace as another program might write it: no weights, optionally no tokens table."""
    rng = np.random.default_rng(0)
    n_seq, n_tok = len(labels), 6
    seq = np.repeat(np.arange(n_seq), n_tok * 2)
    pos = np.tile(np.repeat(np.arange(n_tok), 2), n_seq)
    layer = np.tile([0, 1], n_seq * n_tok)
    experts = [sorted(rng.choice(8, 2, replace=False).tolist()) for _ in seq]
    tokens = None
    if with_tokens:
        tokens = {"seq_id": np.repeat(np.arange(n_seq), n_tok).astype(np.uint32),
                  "pos": np.tile(np.arange(n_tok), n_seq).astype(np.uint32),
                  "token_id": rng.integers(0, 20, n_seq * n_tok).astype(np.uint32), "phase": ["prompt"] * (n_seq * n_tok)}
    write_trace(path, model={"n_experts": 8, "top_k": 2, "moe_layers": [0, 1]}, tokens=tokens,
                routes={"seq_id": seq.astype(np.uint32), "pos": pos.astype(np.uint32), "layer": layer.astype(np.uint16),
                        "experts": pa.array(experts, pa.list_(pa.uint8()))},
                sequences={"seq_id": np.arange(n_seq, dtype=np.uint32), "text": ["x <b>"] * n_seq, "topic": labels})
    return moescope.open_trace(path)


def test_foreign_trace_without_tokens_or_weights(tmp_path):
    trace = _routes_only(tmp_path / "t", ["<i>a</i>", "b", "c"] * 4)
    v = routing_signatures(trace, label="topic", **FAST).values
    assert v["n_sequences"] == 12 and v["folds"] == 4 and len(v["per_layer_accuracy"]) == 2
    assert v["token_id_control_accuracy_mean"] is None and v["bag_of_tokens_accuracy_mean"] is None
    assert any("tokens" in n for n in v["notes"]) and any("folds reduced" in n for n in v["notes"])
    with pytest.raises(DataError, match="no tokens table"):
        routing_signatures(trace, label="topic", phase="generated", **FAST)


def test_label_errors(tmp_path):
    trace = _routes_only(tmp_path / "t", ["a", "b", "b", "a", "c"])
    with pytest.raises(DataError, match=r"no field 'label'; available: topic"):
        routing_signatures(trace, label="label", **FAST)
    with pytest.raises(DataError, match=r"'c' .* single sequence"):
        routing_signatures(trace, label="topic", **FAST)
    one = _routes_only(tmp_path / "one", ["a"] * 4)
    with pytest.raises(DataError, match="at least 2 labels"):
        routing_signatures(one, label="topic", **FAST)


def test_saved_result_figures_and_report_section(tmp_path):
    trace = moescope.open_trace(labelled_trace(tmp_path / "t", layers=2, n_seq=40, biased_layers=(1,), generated=4))
    result = routing_signatures(trace, label="label", permutations=10, control_draws=1, phase="all")
    saved = json.loads(result.save(tmp_path / "out").read_text())
    assert saved["analysis"] == "signatures" and saved["params"]["phase"] == "all"
    assert all(key in saved for key in REQUIRED)
    assert {f.split("/")[1] for f in saved["figures"]} == {
        "pca.png", "tsne.png", "per_layer_accuracy.png", "first_n_accuracy.png", "permutation.png", "confusion.png"}
    assert all((tmp_path / "out" / f).is_file() for f in saved["figures"])
    from moescope.report.html import report_env
    from moescope.report.sections.signatures import render

    saved["labels"][0] = "<script>alert(1)</script>"
    section = render(saved, tmp_path / "out", report_env())
    assert "<script>alert(1)" not in section.html and "&lt;script&gt;" in section.html
    assert "token-id routing control" in section.html and section.summary.startswith("Routing signatures predict")


def test_cli_signatures(tmp_path):
    from typer.testing import CliRunner

    from moescope.cli import _register_commands, app

    _register_commands()
    path = labelled_trace(tmp_path / "t", layers=2, n_seq=24, seq_len=16, biased_layers=(1,))
    res = CliRunner().invoke(app, ["analyze", "signatures", str(path), "--label", "label", "--out", str(tmp_path / "o"),
                                   "--permutations", "5", "--control-draws", "1", "--folds", "3", "--repeats", "2",
                                   "--group", "none", "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "label permutation" in res.output and "95% CI" in res.output and (tmp_path / "o" / "results.json").is_file()


# -- known answers of the inference (issue 13): document leak, vocabulary only, planted layers ------
def document_leak_trace(path, *, n_docs=20, pieces=4, seq_len=32, layers=4, n_experts=8, top_k=2, seed=0):
    """Labels random per document (balanced), every piece of a document routed by the document's own
    fingerprint (a random expert preference), tokens random: the labels carry no routing signal that
    generalises to a new document, but pieces of one document look alike."""
    rng = np.random.default_rng(seed)
    doc_label = rng.permutation(np.arange(n_docs) % 2)
    pref = rng.normal(size=(n_docs, layers, n_experts)) * 3.0
    S = n_docs * pieces
    doc = np.repeat(np.arange(n_docs), pieces)
    seq = np.repeat(np.arange(S), seq_len * layers)
    pos = np.tile(np.repeat(np.arange(seq_len), layers), S)
    layer = np.tile(np.arange(layers), S * seq_len)
    scores = pref[doc[seq], layer] + rng.gumbel(size=(len(seq), n_experts))
    experts = np.argsort(-scores, axis=1)[:, :top_k]
    tokens = {"seq_id": np.repeat(np.arange(S), seq_len).astype(np.uint32),
              "pos": np.tile(np.arange(seq_len), S).astype(np.uint32),
              "token_id": rng.integers(0, 50, S * seq_len).astype(np.uint32), "phase": ["prompt"] * (S * seq_len)}
    write_trace(path, model={"n_experts": n_experts, "top_k": top_k, "moe_layers": list(range(layers))}, tokens=tokens,
                routes={"seq_id": seq.astype(np.uint32), "pos": pos.astype(np.uint32), "layer": layer.astype(np.uint16),
                        "experts": pa.array(experts.astype(np.uint8).tolist(), pa.list_(pa.uint8()))},
                sequences={"seq_id": np.arange(S, dtype=np.uint32), "text": ["piece"] * S,
                           "label": np.array(["x", "y"])[doc_label[doc]].tolist(),
                           "doc_id": [f"doc-{d}" for d in doc]})
    return moescope.open_trace(path)


def test_document_leak_trap_is_high_without_groups_and_at_chance_with_them(tmp_path):
    trace = document_leak_trace(tmp_path / "t")
    kw = dict(label="label", permutations=19, control_draws=0, figures=False, repeats=3)
    leaky = routing_signatures(trace, group="none", **kw).values
    grouped = routing_signatures(trace, **kw).values  # doc_id found and used
    assert leaky["group_field"] is None and leaky["cv_accuracy_mean"] >= 0.9 and leaky["permutation_p_value"] <= 0.05
    assert grouped["group_field"] == "doc_id" and any("doc_id" in n for n in grouped["notes"])
    assert grouped["cv_accuracy_mean"] <= 0.65 and grouped["permutation_p_value"] > 0.05
    assert grouped["cv_accuracy_ci_low"] <= 0.5


def test_vocabulary_only_labels_routing_adds_nothing_over_the_token_id_control(tmp_path):
    v = _run(token_routed_trace(tmp_path / "t", layers=2, n_seq=60), repeats=3)
    assert v["cv_accuracy_mean"] >= 0.7
    assert v["adds_over_token_id_control_ci_low"] <= 0.0 or v["adds_over_token_id_control_p_value"] > 0.05
    assert v["token_id_control_unseen_token_share"] < 0.05


def test_planted_layers_are_significant_after_holm_and_only_there(tmp_path):
    v = _run(labelled_trace(tmp_path / "t", layers=4, biased_layers=(1, 3), strength=1.0), permutations=99,
             control_draws=0, repeats=2)
    holm = v["per_layer_p_value_holm"]
    assert len(holm) == 4 and holm[1] < 0.05 and holm[3] < 0.05
    assert holm[0] > 0.05 and holm[2] > 0.05
    assert v["best_layer"] in (1, 3) and 0 < v["best_layer_stability"] <= 1
    for key in ("cv_accuracy_ci_low", "cv_accuracy_ci_high", "adds_over_bag_of_tokens_p_value",
                "adds_over_token_id_control_ci_low", "cv_repeats", "group_field"):
        assert key in v
    assert v["cv_accuracy_ci_low"] <= v["cv_accuracy_mean"] <= v["cv_accuracy_ci_high"]


def test_token_id_control_is_fitted_on_the_training_fold_only():
    """Brute force: the map from the training sequences' counts, the fallback for unseen ids."""
    from scipy.sparse import csr_matrix

    from moescope.analysis.signature_controls import SequenceTokenExperts, TokenIdControl

    rng = np.random.default_rng(0)
    S, L, V, E, k = 6, 2, 5, 4, 2
    per_seq = rng.integers(0, 3, size=(S, L, V, E))
    per_seq[:2, :, 4, :] = 0
    per_seq[2:, :, 4, :] = 0
    per_seq[0, :, 4, :] = [3, 0, 1, 2]  # token 4 occurs in sequence 0 only
    s, li, v, e = np.nonzero(per_seq)
    ste = SequenceTokenExperts.from_rows(s, (li * V + v) * E + e, per_seq[s, li, v, e], np.arange(V), (L, V, E))
    occ = rng.integers(1, 4, size=(S, V)).astype(float)
    occ[1:, 4] = 0
    n_tok = occ.sum(axis=1, keepdims=True).repeat(L, axis=1)
    ctrl = TokenIdControl(ste, csr_matrix(occ), n_tok, k)
    train, test = np.array([1, 2, 3, 4, 5]), np.array([0])
    feats, unseen = ctrl.fold(train, test)
    counts = per_seq[train].sum(axis=0)  # (L, V, E)
    expect = np.zeros((S, L, E))
    for layer in range(L):
        freq = counts[layer].sum(axis=0)
        for tok in range(V):
            if counts[layer, tok].sum() == 0:
                row = k * freq / freq.sum()
            else:
                order = sorted(range(E), key=lambda x: (-counts[layer, tok, x], x))[:k]
                row = np.isin(np.arange(E), order).astype(float)
            expect[:, layer] += occ[:, [tok]] * row
    np.testing.assert_allclose(feats, (expect / n_tok[:, :, None]).reshape(S, -1))
    assert unseen == pytest.approx(occ[0, 4] / occ[0].sum())


def test_group_errors_name_the_fix(tmp_path):
    trace = document_leak_trace(tmp_path / "t", n_docs=3, pieces=3, seq_len=8, layers=1)
    with pytest.raises(DataError, match="fewer than 2 groups of 'doc_id'.*--group none"):
        routing_signatures(trace, label="label", **FAST)
    with pytest.raises(DataError, match="no field 'document'; available: .*doc_id"):
        routing_signatures(trace, label="label", group="document", **FAST)


def test_token_id_control_falls_back_to_the_whole_trace_map_when_too_large(tmp_path, monkeypatch):
    import moescope.analysis.signatures as sigmod

    path = token_routed_trace(tmp_path / "t", layers=2, n_seq=40)
    monkeypatch.setattr(sigmod, "MAX_SEQUENCE_TOKEN_EXPERT_ROWS", 0)
    v = _run(path, repeats=2, permutations=5, control_draws=0)
    assert v["token_id_control_fitted_per_fold"] is False and v["token_id_control_unseen_token_share"] == 0.0
    assert any("whole-trace map" in n for n in v["notes"])
    assert v["token_id_control_accuracy_mean"] >= 0.6


def test_streamed_token_expert_keys_match_a_duckdb_count(tmp_path):
    from moescope.analysis.signature_controls import sequence_token_expert_counts

    trace = moescope.open_trace(labelled_trace(tmp_path / "t", layers=3, n_seq=12, seq_len=10, generated=3,
                                               token_strength=1.0))
    seq_ids = np.array([1, 2, 5, 7, 11])
    ste = sequence_token_expert_counts(trace, phase="prompt", seq_ids=seq_ids)
    L, V, E = ste.shape
    got = {}
    for j, s in enumerate(seq_ids):
        c = ste.counts(ste.rows_of([j]), minlength=L * V * E)
        for key in np.flatnonzero(c):
            li, rest = divmod(int(key), V * E)
            v, e = divmod(rest, E)
            got[(int(s), li, int(ste.vocab[v]), e)] = int(c[key])
    rows = trace.rows("SELECT r.seq_id, r.layer, t.token_id, e, count(*) FROM (SELECT seq_id, pos, layer, "
                      "unnest(experts) AS e FROM routes) r JOIN tokens t ON r.seq_id = t.seq_id AND r.pos = t.pos "
                      "WHERE t.phase = 'prompt' AND r.seq_id IN (1, 2, 5, 7, 11) GROUP BY ALL")
    assert got == {(int(s), int(li), int(t), int(e)): int(n) for s, li, t, e, n in rows}


def test_counting_pass_keys_give_the_same_control_as_a_separate_pass(tmp_path):
    """The per-sequence token-expert keys kept by the shared counting pass (on disk, the pass's
    whole vocabulary) give the same per-sequence counts and the same signature results as the
    separate pass over the analysed sequences only (their own, smaller vocabulary)."""
    import dataclasses

    from moescope.analysis.signature_controls import sequence_token_expert_counts
    from moescope.analysis.signatures import evaluate_signatures, gather_signature_inputs, shared_counts

    trace = moescope.open_trace(labelled_trace(tmp_path / "t", layers=3, n_seq=40, seq_len=12, generated=3,
                                               token_strength=1.0, vocab=200))
    counts = shared_counts(trace, phase="prompt")
    assert counts.seq_token_experts is not None
    seq_ids = np.array([1, 2, 5, 7, 11, 30])
    a = counts.seq_token_experts.select(seq_ids)
    b = sequence_token_expert_counts(trace, phase="prompt", seq_ids=seq_ids)
    assert len(a.vocab) > len(b.vocab)  # the trap: different vocabularies, same counts
    for j in range(len(seq_ids)):
        ca, cb = a.counts_of([j], minlength=int(np.prod(a.shape))), b.counts_of([j], minlength=int(np.prod(b.shape)))
        ka, kb = np.flatnonzero(ca), np.flatnonzero(cb)
        la, va, ea = np.unravel_index(ka, a.shape)
        lb, vb, eb = np.unravel_index(kb, b.shape)
        assert (sorted(zip(la, a.vocab[va], ea, ca[ka])) == sorted(zip(lb, b.vocab[vb], eb, cb[kb])))
    inputs = gather_signature_inputs(trace, "label", max_sequences=24, seed=1)  # a sample: a smaller vocabulary
    separate = dataclasses.replace(inputs, seq_token_experts=sequence_token_expert_counts(
        trace, phase="prompt", seq_ids=inputs.seq_counts.seq_ids))
    assert len(inputs.seq_token_experts.vocab) > len(separate.seq_token_experts.vocab)
    kw = dict(label="label", permutations=5, repeats=2, folds=3, control_draws=1, seed=0, figures=False, n_jobs=1)
    got, want = evaluate_signatures(inputs, **kw)[0], evaluate_signatures(separate, **kw)[0]
    assert got["token_id_control_accuracy_mean"] is not None
    for key in ("token_id_control_accuracy_mean", "token_id_control_cohens_d", "token_id_control_unseen_token_share",
                "adds_over_token_id_control", "per_layer_token_id_control_accuracy"):
        assert got[key] == want[key], key


@pytest.mark.parametrize("command", ["stats", "signatures"])
def test_cli_negative_jobs_is_one_line(tmp_path, capsys, command):
    from test_cli_errors import assert_one_line_error, run_cli

    path = labelled_trace(tmp_path / "t", layers=2, n_seq=8, seq_len=8)
    code, err = run_cli(["analyze", command, str(path), "--label", "label", "--out", str(tmp_path / "o"),
                         "--jobs", "-1"], capsys)
    assert_one_line_error(code, err, "--jobs must be at least 0")
    assert not (tmp_path / "o").exists()


def test_cap_vocabulary_keeps_the_most_widespread_ids_and_pools_the_rest():
    from scipy.sparse import csr_matrix

    from moescope.analysis.signature_controls import cap_vocabulary

    train = csr_matrix(np.array([[1, 0, 2, 0, 1], [1, 1, 0, 0, 3], [2, 0, 1, 0, 0]], float))
    test = csr_matrix(np.array([[0, 4, 0, 5, 1]], float))
    tr, te = cap_vocabulary(train, test, 3)  # ids 0 (3 sequences) and 2 (2; ties to the lower id) kept
    assert tr.toarray().tolist() == [[1, 2, 1], [1, 0, 4], [2, 1, 0]]
    assert te.toarray().tolist() == [[0, 0, 10]]  # an id unseen in training is pooled too
    assert np.array_equal(tr.sum(axis=1), train.sum(axis=1))


def test_bag_of_tokens_is_capped_only_when_sequences_and_ids_are_both_many(tmp_path, monkeypatch):
    import moescope.analysis.signature_controls as sc

    path = token_routed_trace(tmp_path / "t", layers=2, n_seq=60)
    full = _run(path, repeats=1, permutations=5, control_draws=0)
    assert full["bag_of_tokens_columns"] > 24 and not any("bag of tokens:" in n for n in full["notes"])
    monkeypatch.setattr(sc, "BAG_MAX_COLUMNS", 24)  # 48 training sequences, more ids than that
    capped = _run(path, repeats=1, permutations=5, control_draws=0)
    assert capped["bag_of_tokens_columns"] == 24
    assert any("bag of tokens:" in n and "23 most widespread" in n for n in capped["notes"])
    assert capped["bag_of_tokens_accuracy_mean"] >= 0.6  # labels differ in vocabulary: still found (chance 0.25)
    assert capped["cv_accuracy_mean"] == full["cv_accuracy_mean"]  # nothing else changes


def test_per_layer_tests_draw_enough_shuffles_for_holm_only_where_there_is_an_effect(tmp_path):
    """12 layers, 50 shared shuffles: a fixed-n test could not go below 12/51 after Holm. The
    sequential per-layer test takes planted layers to their budget (p <= 0.01 after Holm) while
    layers without an effect stop once 10 shuffles reach them (here within one extra batch)."""
    v = _run(labelled_trace(tmp_path / "t", layers=12, biased_layers=(3, 8), strength=1.0), permutations=50,
             control_draws=0, repeats=2)
    budget = v["per_layer_permutations_max"]
    assert budget == 1199  # ceil(12 / 0.01) - 1
    holm = v["per_layer_p_value_holm"]
    assert holm[3] <= 0.011 and holm[8] <= 0.011
    assert v["per_layer_permutations"][3] == v["per_layer_permutations"][8] == budget
    others = [i for i in range(12) if i not in (3, 8)]
    assert all(holm[i] > 0.05 for i in others)
    assert all(v["per_layer_permutations"][i] <= 50 + 200 for i in others)
    assert not any("cannot fall below" in n for n in v["notes"])
    capped = _run(tmp_path / "t", permutations=50, control_draws=0, repeats=2, layer_permutations=99)
    assert capped["per_layer_permutations_max"] == 99 and any("cannot fall below" in n for n in capped["notes"])
