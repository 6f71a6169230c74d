"""Known answers of the POS analysis on synthetic traces: planted POS routing, a null trace, word-form routing."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from moescope.analysis.pos import PosParams, pos_analysis, routing_paths
from moescope.errors import DataError
from pos_synthetic import synthetic

FAST = PosParams(folds=3, repeats=2, seed=0, n_shuffles=10, tsne_points=0, ablation=(1, 3))
PLANTED = (1, 2)  # indices into moe_layers (1, 3, 5, 7): layers 3 and 5 carry POS


def _run(kind: str, **kw):
    d = synthetic(kind, n_tokens=2000, **kw)
    return pos_analysis(d["tokens"], d["routes"], **d["model"], params=FAST, figures=False).values


@pytest.fixture(scope="module")
def planted():
    return _run("planted", planted=PLANTED)


@pytest.fixture(scope="module")
def null():
    return _run("null")


def test_planted_routing_is_recovered(planted):
    v = planted
    assert v["probe_accuracy"] > v["majority_accuracy"] + 0.4  # majority ~0.35, probe ~0.9
    assert v["probe_accuracy"] > v["word_form_accuracy"] + 0.4  # token ids carry no tag here
    # token ids carry no tag here: tags permuted within ids take the probe near the majority rate (a little
    # above: tokens whose id occurs once in a test fold keep their real tag), p at the floor
    assert -0.03 < v["token_null_probe_accuracy"] - v["majority_accuracy"] < 0.1
    assert v["token_null_probe_accuracy"] < v["probe_accuracy"] - 0.3
    assert v["probe_p_value_token_null"] == pytest.approx(1 / 11)
    assert v["macro_f1"] > 0.8 and min(v["per_tag_f1"].values()) > 0.7
    counts = np.asarray(v["confusion_matrix"]["counts"])
    assert counts.sum() == v["n_tokens_probe"] and np.trace(counts) / counts.sum() > 0.85


def test_planted_kl_exceeds_chance_in_exactly_the_planted_layers(planted):
    excess = np.subtract(planted["kl_layer_mean"], planted["kl_layer_mean_naive_null"])
    assert [i for i in range(4) if excess[i] > 0.05] == list(PLANTED), excess
    assert all(abs(excess[i]) < 0.01 for i in range(4) if i not in PLANTED)
    for tag in planted["tags"]:
        kl = np.asarray(planted["kl_from_uniform"][tag])
        p95 = np.asarray(planted["kl_from_uniform_naive_null_p95"][tag])
        chance = np.asarray(planted["kl_from_uniform_naive_null"][tag])
        assert all(kl[i] > p95[i] + 0.1 for i in PLANTED), (tag, kl, p95)
        assert all(abs(kl[i] - chance[i]) < 0.02 for i in range(4) if i not in PLANTED), (tag, kl, chance)
        gain, gain_chance = planted["top_gain"][tag], planted["top_gain_naive_null"][tag]
        assert all(gain[i] > gain_chance[i] + 0.3 for i in PLANTED)


def test_planted_spec_has_the_known_value(planted):
    # A planted tag reaches each of its 2 experts with p = 0.8 + 0.2 * 7/28 = 0.85; uniform share k/E = 1/4.
    for tag in ("NOUN", "VERB"):
        for layer in PLANTED:
            spec = np.asarray(planted["spec"][tag][layer])
            assert np.sort(spec)[-2:] == pytest.approx([3.4, 3.4], abs=0.25)
            assert sorted(planted["top_experts"][tag][layer][:2]) == sorted(np.argsort(-spec)[:2].tolist())
            assert spec.sum() == pytest.approx(8.0, abs=0.01)  # shares sum to k, so Spec sums to k / (k/E) = E


def test_ablation_drops_with_the_planted_layers(planted):
    ab, full, maj = planted["ablation"], planted["probe_accuracy"], planted["majority_accuracy"]
    assert ab["n_layers"] == 4 and ab["full"] == pytest.approx(full)
    assert ab["drop_first"]["1"] > full - 0.05 and ab["drop_last"]["1"] > full - 0.05  # unplanted end layers
    assert ab["drop_first"]["3"] < maj + 0.06 and ab["drop_last"]["3"] < maj + 0.06  # only an unplanted layer left


def test_null_trace_gives_chance(null):
    v = null
    # An MLP fitting noise predicts minority tags now and then: chance is at or a little under the majority rate.
    assert -0.08 < v["probe_accuracy"] - v["majority_accuracy"] < 0.03
    assert abs(v["probe_accuracy"] - v["token_null_probe_accuracy"]) < 0.05
    assert v["probe_p_value_token_null"] > 0.05
    excess = np.subtract(v["kl_layer_mean"], v["kl_layer_mean_naive_null"])
    assert np.all(np.abs(excess) < 0.01), excess  # chance KL is ~0.003 nats with these counts
    above = sum(k > p for t in v["tags"] for k, p in zip(v["kl_from_uniform"][t], v["kl_from_uniform_naive_null_p95"][t]))
    assert above <= 3  # of 5 tags x 4 layers, ~1 expected above a 95th percentile by chance
    gains = np.subtract(v["top_gain_layer_mean"], v["top_gain_layer_mean_naive_null"])
    assert np.all(np.abs(gains) < 0.05)
    assert all(-0.08 < a - v["majority_accuracy"] < 0.03 for side in ("drop_first", "drop_last")
               for a in v["ablation"][side].values())


def test_word_form_routing_cannot_beat_the_word_form_baseline():
    # Routing depends only on the token id and the tag is a function of it: the path holds no more
    # than the id, so the probe is at most as good as word form (a linear probe reads part of it).
    v = _run("word_form", vocab=60)
    assert v["word_form_accuracy"] > 0.97
    assert v["probe_accuracy"] <= v["word_form_accuracy"] + 0.01
    assert v["probe_accuracy"] > v["majority_accuracy"] + 0.3
    assert v["probe_minus_word_form"]["ci_high"] < 0.02


def test_results_save_figures_and_report_section(tmp_path):
    import jinja2

    from moescope.report.sections.pos import render

    d = synthetic("planted", n_tokens=900)
    params = PosParams(folds=3, repeats=1, n_shuffles=3, tsne_points=200, ablation=(2,), token_null_permutations=50)
    result = pos_analysis(d["tokens"], d["routes"], **d["model"], params=params, tag_source="test <b>tags</b>")
    path = result.save(tmp_path)
    body = json.loads(path.read_text())
    for key in ("probe_accuracy", "probe_accuracy_ci", "macro_f1", "majority_accuracy", "word_form_accuracy",
                "token_null_probe_accuracy", "probe_p_value_token_null", "naive_null", "kl_from_uniform", "ablation", "per_tag_f1", "confusion_matrix",
                "word_form_accuracy_seen", "word_form_accuracy_unseen", "probe_accuracy_seen", "probe_accuracy_unseen",
                "word_level_accuracy", "probe_minus_word_form", "kl_from_uniform_token_null",
                "kl_token_null_p_value_holm"):
        assert key in body, key
    assert all(len(body["kl_from_uniform"][t]) == 4 for t in body["tags"])
    assert body["ablation"]["drop_first"].keys() == {"2"} and body["params"]["ablation"] == [2]
    names = ("accuracy", "per_tag_f1", "confusion", "kl_by_layer", "spec", "ablation", "tsne")
    assert {f"figures/{n}.png" for n in names} == set(body["figures"])
    section = render(body, tmp_path, jinja2.Environment(autoescape=True))
    assert section.key == "pos" and "word form" in section.summary
    assert "test &lt;b&gt;tags&lt;/b&gt;" in section.html and "<b>tags" not in section.html
    assert section.html.count("data:image/png;base64,") == 7


def test_routing_paths_keep_layer_order_and_drop_incomplete_tokens():
    d = synthetic("null", n_tokens=60)
    routes = d["routes"]
    rng = np.random.default_rng(1)
    shuffled = routes.take(pa.array(rng.permutation(routes.num_rows)))
    paths, rows = routing_paths(d["tokens"], shuffled, d["model"]["moe_layers"])
    expected = np.asarray(routes.column("experts").to_pylist()).reshape(60, 4, 2)
    assert rows.tolist() == list(range(60)) and np.array_equal(paths, expected)
    missing = routes.filter(pa.array(np.arange(routes.num_rows) != 4 * 7 + 2))  # token 7 loses one layer
    paths, rows = routing_paths(d["tokens"], missing, d["model"]["moe_layers"])
    assert 7 not in rows.tolist() and len(rows) == 59


def test_rare_tags_are_dropped_and_named():
    d = synthetic("planted", n_tokens=600)
    upos = d["tokens"].column("upos").to_pylist()
    upos[0], upos[1] = "INTJ", "INTJ"  # 2 tokens < 3 folds
    upos[2] = None  # untagged: left out
    tokens = d["tokens"].set_column(4, "upos", pa.array(upos, pa.string()))
    capped = dataclasses.replace(FAST, max_tokens=300, ablation=())
    v = pos_analysis(tokens, d["routes"], **d["model"], params=capped, figures=False).values
    assert v["dropped_tags"] == {"INTJ": 2} and v["cv_groups"] == "sentence" and "INTJ" not in v["tags"] and v["n_tokens"] == 597
    assert v["n_tokens_probe"] == 300 and sum(v["tag_counts"].values()) == 597  # the probe's cap; stats use all
    assert np.asarray(v["confusion_matrix"]["counts"]).sum() == 300 and v["ablation"]["drop_first"] == {}


def test_untagged_tokens_table_is_refused():
    d = synthetic("null", n_tokens=60)
    with pytest.raises(DataError, match="no upos column"):
        pos_analysis(d["tokens"].drop_columns(["upos"]), d["routes"], **d["model"], params=FAST)


# -- the token-identity null of KL / Spec ------------------------------------------------------------
def test_token_null_finds_the_planted_tag_effect_in_the_planted_layers_only(planted):
    holm = np.array([planted["kl_token_null_p_value_holm"][t] for t in planted["tags"]])  # (tags, layers)
    assert planted["token_null"]["permutations"] >= 2000  # 20 cells: the floor survives Holm at 0.01
    assert np.all(holm[:, list(PLANTED)] <= 0.01), holm
    assert np.all(np.delete(holm, list(PLANTED), axis=1) > 0.05), holm
    gain = np.array([planted["top_gain_token_null_p_value_holm"][t] for t in planted["tags"]])
    assert np.all(gain[:, list(PLANTED)] <= 0.01) and np.all(np.delete(gain, list(PLANTED), axis=1) > 0.05)


@pytest.fixture(scope="module")
def identity():
    return _run("identity", vocab=60)


def test_token_null_sees_nothing_when_tag_and_routing_both_follow_the_token_id(identity):
    # The trap: routing and tags both follow the token id. The old statistic (KL against tags
    # shuffled across all tokens) claims a POS effect in every layer; the token-identity null does not.
    v = identity
    old_claims = [sum(k > p for k, p in zip(v["kl_from_uniform"][t], v["kl_from_uniform_naive_null_p95"][t]))
                  for t in v["tags"]]
    assert sum(old_claims) >= 0.8 * len(v["tags"]) * 4, old_claims
    assert v["token_null"]["n_tokens_permutable"] > 1000  # ids carry several tags: the null does move tags
    holm = np.array([v["kl_token_null_p_value_holm"][t] for t in v["tags"]])
    assert np.all(holm > 0.05), holm
    excess = np.subtract(v["kl_layer_mean"], v["kl_layer_mean_token_null"])
    assert np.all(np.abs(excess) < 0.02), excess


def test_token_null_cannot_move_tags_that_are_a_function_of_the_token_id():
    v = _run("word_form", vocab=60)
    assert v["token_null"]["n_tokens_permutable"] == 0
    assert all(p == 1.0 for t in v["tags"] for p in v["kl_token_null_p_value_holm"][t])


# -- cross-validation by sentence, seen / unseen token ids, the paired comparison --------------------
def test_sentence_grouping_removes_what_a_token_level_split_leaks():
    # The trap: routing and tags both follow the sentence, not the token. A token-level split puts
    # tokens of every test sentence in training, and the probe learns the sentence's experts.
    d = synthetic("sentence", n_tokens=2400, seq_len=200)  # 12 long sentences, each with its own experts
    by = {g: pos_analysis(d["tokens"], d["routes"], **d["model"], params=dataclasses.replace(FAST, cv_groups=g,
                                                                                               ablation=()),
                          figures=False).values for g in ("token", "sentence")}
    assert by["token"]["probe_accuracy"] > by["token"]["majority_accuracy"] + 0.12
    assert by["sentence"]["probe_accuracy"] < by["sentence"]["majority_accuracy"] + 0.03
    assert by["sentence"]["cv_groups"] == "sentence" and by["token"]["cv_groups"] == "token"


def test_word_form_is_reported_on_seen_and_unseen_token_ids():
    v = _run("word_form", vocab=1500)  # many ids occur once: unseen in the training folds
    assert 0.25 < v["unseen_token_share"] < 0.75
    assert v["word_form_accuracy_seen"] > 0.97  # the tag is a function of the id
    assert v["word_form_accuracy_unseen"] < 0.45  # the majority-tag fallback, not word form
    assert v["word_form_accuracy_unseen"] < v["probe_accuracy_unseen"] + 0.1  # neither knows unseen ids
    assert v["word_level_accuracy"] == pytest.approx(v["word_form_accuracy"], abs=1e-9)  # one-token words


def test_paired_probe_minus_word_form(planted):
    t = planted["probe_minus_word_form"]
    assert t["ci_low"] > 0.3 and t["p_value"] < 0.001  # routing carries the tag, token ids do not
    assert t["difference"] == pytest.approx(np.mean(planted["probe_accuracy_folds"])
                                            - np.mean(planted["word_form_accuracy_folds"]))
    assert planted["probe_p_value_token_null"] == pytest.approx(1 / 11)  # 10 permutations: at the floor


# -- the probe's token-identity null and the inner tuning of token mode ------------------------------
def test_probe_token_null_is_not_fooled_by_routing_that_follows_the_token_id(identity):
    # The trap: routing and tags both follow the token id, and given the id the tag says nothing of
    # routing. A probe beats tags shuffled over all tokens of a fold by reading the id from the path
    # (shown below with the naive permutation); against tags permuted within ids it is at its null.
    from moescope.inference import fold_permutations, repeated_grouped_splits, ridge_cv
    from moescope.analysis.pos import path_features

    v = identity
    assert v["probe_accuracy"] > v["majority_accuracy"] + 0.1  # routing does carry the id, hence the tag
    assert v["probe_p_value_token_null"] > 0.05
    assert abs(v["probe_accuracy"] - v["token_null_probe_accuracy"]) < 0.05
    d = synthetic("identity", n_tokens=2000, vocab=60)
    y = np.unique(np.asarray(d["tokens"].column("upos").to_pylist()), return_inverse=True)[1].ravel()
    seq = np.asarray(d["tokens"].column("seq_id").to_pylist())
    paths, _ = routing_paths(d["tokens"], d["routes"], d["model"]["moe_layers"])
    splits = repeated_grouped_splits(y, seq, folds=3, repeats=1, seed=0)
    naive = ridge_cv(path_features(paths, 8), y, splits, groups=seq,
                     permuted_labels=fold_permutations(y, None, splits, 10, seed=3))
    assert naive.p_value == pytest.approx(1 / 11) and naive.accuracy > naive.null_accuracy.max() + 0.1


def test_probe_token_null_permutes_tags_only_among_one_ids_tokens_of_one_test_fold():
    from moescope.analysis.pos_null import token_identity_fold_permutations
    from moescope.inference import repeated_grouped_splits

    rng = np.random.default_rng(0)
    y, ids, seq = rng.integers(0, 3, 300), rng.integers(0, 20, 300), np.arange(300) // 10
    splits = repeated_grouped_splits(y, seq, folds=3, repeats=2, seed=0)
    perm = token_identity_fold_permutations(y, ids, splits, 5, seed=1)
    assert perm.shape == (2, 5, 300) and (perm != y).mean() > 0.3  # tags do move
    for r, rep in enumerate(splits):
        for _, test in rep:  # every (id, tag) count of every test fold is kept
            for i in range(5):
                assert sorted(zip(ids[test], y[test])) == sorted(zip(ids[test], perm[r, i, test]))


def test_token_mode_tunes_the_penalty_by_token_not_by_sentence():
    # Token-level folds put tokens of every test sentence in training, so a feature unique to a
    # sentence predicts its tags. The inner tuning must mirror that split (leave one token out):
    # leave-one-sentence-out never sees that feature help, sees only the noise features overfit,
    # and picks a penalty for a harder task than the one scored.
    from moescope.analysis.pos_probe import cv_splits, probe_and_baselines
    from moescope.inference import ridge_cv

    rng = np.random.default_rng(0)
    n_sent, per = 60, 12
    seq = np.repeat(np.arange(n_sent), per)
    y = np.repeat(rng.integers(0, 3, n_sent), per)  # every token of a sentence has the sentence's tag
    X = np.hstack([np.eye(n_sent)[seq], rng.normal(size=(len(y), 150))])  # which sentence + noise
    ids = rng.integers(0, 500, len(y))
    splits = cv_splits(y, seq, folds=3, repeats=1, seed=0, grouped=False)
    run = (lambda grouped: probe_and_baselines(X, y, ids, ids, seq, splits, n_tags=3, n_shuffles=0, seed=0,  # noqa: E731
                                               grouped=grouped))
    by_token, by_sentence = run(False), run(True)
    # token mode is exactly ridge_cv tuned leave-one-token-out on the same splits
    direct = ridge_cv(X, y, splits, groups=None)
    assert by_token["probe_accuracy"] == pytest.approx(direct.accuracy)
    assert by_token["alpha_factors_chosen"] == sorted({float(a) for a in direct.alpha_factor.ravel()})
    assert by_token["probe_accuracy"] > 0.95 and by_token["alpha_factors_chosen"] == [1e-4]
    # tuned by sentence, some folds choose a strong penalty and lose what the outer folds measure
    assert max(by_sentence["alpha_factors_chosen"]) >= 10 and by_sentence["probe_accuracy"] < by_token["probe_accuracy"] - 0.1
