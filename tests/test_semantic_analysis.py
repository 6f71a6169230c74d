"""Known-answer tests of the semantic routing analysis on synthetic traces with planted structure."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from moescope.analysis.semantic import SemanticParams, analyze_semantic, pair_kappa
from moescope.semantic.align import align_targets
from moescope.semantic.pipeline import analyse_trace
from moescope.store.tables import write_trace

E, K, LAYERS = 16, 2, [0, 1, 3, 4]  # layer 2 is "dense": no routes rows


def _uniform_sets(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.argsort(rng.random((n, E)), axis=1)[:, :K]


def synthetic_trace(path, *, planted=(1, 3), n_pairs=400, n_items=200, p_pref=0.8, by_token=False,
                    ident_same=0.5, ident_diff=0.5, confound=False, seed=0,
                    route_seed=None):
    """A trace of sense pairs and substitution items.

    In `planted` layers a target token is routed, with probability p_pref, to a preferred
    expert set of its (lemma, sense) (or of its token id when `by_token`), otherwise
    uniformly; in every other layer and for every other token routing is uniform. A good
    substitute shares its original's preferred set, a control has its own.
    Same-sense pairs have identical target tokens with probability ident_same, different-
    sense pairs with probability ident_diff (identical: "bank"/"bank", else "bank"/"Bank").
    `confound`: a lemma-level confound and no sense effect. Half the lemmas are "sticky" (in
    the planted layers, every context of the lemma goes to one lemma-level preferred set,
    whatever the sense) and 80% of their pairs are same-sense; the other lemmas route
    uniformly and 20% of their pairs are same-sense.
    `route_seed`: a seed of its own for the routing (the same probes routed afresh).
    """
    rng = np.random.default_rng(seed)
    n_lemmas, n_senses = 40, 3
    pref_sense = _uniform_sets(rng, n_lemmas * n_senses).reshape(n_lemmas, n_senses, K)
    pref_lemma = _uniform_sets(rng, n_lemmas) if confound else None
    vocab: dict[str, int] = {}
    pref_token: dict[int, np.ndarray] = {}
    seqs, toks, ctx_pref = [], [], []  # ctx_pref: preferred set of the target of each sequence

    def add(words, target, meta, pref):
        seq_id = len(seqs)
        text, spans = "", []
        for w in words:
            start = len(text) + (1 if text else 0)
            text = f"{text} {w}" if text else w
            spans.append((start, start + len(w)))
        for pos, (w, (s, e)) in enumerate(zip(words, spans)):
            tid = vocab.setdefault(w, len(vocab))
            toks.append((seq_id, pos, tid, s, e, pos == target))
        s, e = spans[target]
        seqs.append({"seq_id": seq_id, "text": text, **meta, "target_start": s, "target_end": e, "source": "synthetic"})
        ctx_pref.append(pref)

    for i in range(n_pairs):
        lemma = int(rng.integers(n_lemmas))
        same = i % 2 == 0 if not confound else rng.random() < (0.8 if lemma < n_lemmas // 2 else 0.2)
        s1 = int(rng.integers(n_senses))
        s2 = s1 if same else (s1 + 1 + int(rng.integers(n_senses - 1))) % n_senses
        identical = rng.random() < (ident_same if same else ident_diff)
        word = f"w{lemma}"
        for role, sense, form in (("a", s1, word), ("b", s2, word if identical else word.upper())):
            meta = {"probe": "wic", "item": f"wic-{i:05d}", "role": role, "label": "same" if same else "different",
                    "lemma": word}
            pref = pref_sense[lemma, sense] if not confound else (pref_lemma[lemma] if lemma < n_lemmas // 2 else None)
            add(["the", form, f"x{i}", role], 1, meta, pref)
    for i in range(n_items):
        lemma, sense = int(rng.integers(n_lemmas)), int(rng.integers(n_senses))
        meta = {"probe": "sub", "item": f"sub-{i:05d}", "label": "", "lemma": f"w{lemma}"}
        pref = pref_sense[lemma, sense]
        add(["a", f"w{lemma}", "here"], 1, {**meta, "role": "original"}, pref)
        add(["a", f"syn{lemma}_{sense}", "here"], 1, {**meta, "role": "substitute"}, pref)
        add(["a", f"ctl{i}", "here"], 1, {**meta, "role": "control"}, _uniform_sets(rng, 1)[0])

    tok = np.array([t[:5] for t in toks], np.int64)
    is_target = np.array([t[5] for t in toks])
    routes = {"seq_id": [], "pos": [], "layer": [], "experts": []}
    rng = rng if route_seed is None else np.random.default_rng(route_seed)
    for layer in LAYERS:
        sets = _uniform_sets(rng, len(tok))
        if layer in planted:
            use = is_target & (rng.random(len(tok)) < p_pref)
            for r in np.nonzero(use)[0]:
                if by_token:
                    sets[r] = pref_token.setdefault(int(tok[r, 2]), _uniform_sets(rng, 1)[0])
                elif ctx_pref[tok[r, 0]] is not None:
                    sets[r] = ctx_pref[tok[r, 0]]
        routes["seq_id"] += tok[:, 0].tolist()
        routes["pos"] += tok[:, 1].tolist()
        routes["layer"] += [layer] * len(tok)
        routes["experts"] += sets.tolist()
    tokens = {"seq_id": pa.array(tok[:, 0], pa.uint32()), "pos": pa.array(tok[:, 1], pa.uint32()),
              "token_id": pa.array(tok[:, 2], pa.uint32()), "phase": ["prompt"] * len(tok),
              "char_start": pa.array(tok[:, 3], pa.int32()), "char_end": pa.array(tok[:, 4], pa.int32())}
    routes_t = pa.table({"seq_id": pa.array(routes["seq_id"], pa.uint32()), "pos": pa.array(routes["pos"], pa.uint32()),
                         "layer": pa.array(routes["layer"], pa.uint16()),
                         "experts": pa.array(routes["experts"], pa.list_(pa.uint8()))})
    write_trace(path, routes=routes_t, tokens=tokens, sequences=pa.Table.from_pylist(seqs),
                model={"name_or_path": "synthetic", "n_experts": E, "top_k": K, "moe_layers": LAYERS},
                overwrite=True)
    return path


PARAMS = SemanticParams(n_boot=500, seed=0)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = synthetic_trace(tmp_path_factory.mktemp("sem") / "trace", planted=(1, 3))
    return analyse_trace(path, params=PARAMS)


def test_kappa_known_values():
    one_hot = lambda sets: np.eye(E, dtype=np.float32)[sets].sum(-2)[:, None, :]  # noqa: E731  (P, 1, E)
    a = one_hot(np.array([[0, 1], [0, 1], [0, 1]]))
    b = one_hot(np.array([[0, 1], [1, 5], [6, 7]]))
    e = K / E
    np.testing.assert_allclose(pair_kappa(a, b, K, E)[:, 0], [1.0, (0.5 - e) / (1 - e), -e / (1 - e)], rtol=1e-6)
    # chance is 0 for uniform sets, also for the mean over several subwords
    rng = np.random.default_rng(1)
    sets = _uniform_sets(rng, 3 * 20000).reshape(20000, 3, K)
    prof = np.eye(E, dtype=np.float32)[sets].sum(-2).mean(1)[:, None, :]  # mean one-hot over 3 subwords
    assert abs(pair_kappa(prof[:10000], prof[10000:], K, E).mean()) < 0.01


def test_sense_effect_found_exactly_where_planted(planted):
    v = planted.values
    assert v["layers"] == LAYERS and v["n_pairs_same"] == 200 and v["n_pairs_different"] == 200
    assert v["n_unaligned_contexts"] == 0
    for i, layer in enumerate(LAYERS):
        if layer in (1, 3):
            assert v["same_sense_kappa"][i] == pytest.approx(0.8**2, abs=0.07)  # kappa = p^2 by construction
            assert abs(v["different_sense_kappa"][i]) < 0.06
            # the unit is the lemma (40 of them): Wilcoxon on 40 per-lemma gaps, all positive
            assert v["difference_ci_low"][i] > 0.4 and v["p_value"][i] < 1e-6 and v["p_value_holm"][i] < 1e-5
            assert v["effect_size"][i] > 0.4 and v["cohens_d"][i] > 1
        else:
            assert abs(v["same_sense_kappa"][i]) < 0.06 and abs(v["different_sense_kappa"][i]) < 0.06
            assert v["difference_ci_low"][i] < 0 < v["difference_ci_high"][i]
            assert v["p_value_holm"][i] > 0.05
        assert abs(v["unrelated_kappa"][i]) < 0.06  # uniform routing elsewhere: load baseline ~ chance
        # its CI (shared cluster bootstrap over unrelated pairs) covers chance and the mean
        assert v["unrelated_ci_low"][i] < 0 < v["unrelated_ci_high"][i]
        assert v["unrelated_ci_low"][i] < v["unrelated_kappa"][i] < v["unrelated_ci_high"][i]


def test_substitution_effect_found_exactly_where_planted(planted):
    v = planted.values
    assert v["n_items"] == 200
    for i, layer in enumerate(LAYERS):
        if layer in (1, 3):
            assert v["substitute_kappa"][i] == pytest.approx(0.8**2, abs=0.08)
            assert abs(v["control_kappa"][i]) < 0.07
            assert v["substitution_difference_ci_low"][i] > 0.4 and v["substitution_p_value"][i] < 1e-10
        else:
            assert v["substitution_difference_ci_low"][i] < 0 < v["substitution_difference_ci_high"][i]
            assert v["substitution_p_value_holm"][i] > 0.05


def test_results_json_and_figures(planted, tmp_path):
    path = planted.save(tmp_path)
    body = json.loads(path.read_text())
    for key in ("same_sense_kappa", "different_sense_kappa", "difference_ci_low", "difference_ci_high", "p_value",
                "substitute_kappa", "control_kappa", "substitution_difference_ci_low", "substitution_p_value",
                "identical_tokens_difference", "distinct_tokens_p_value"):
        assert len(body[key]) == len(LAYERS), key
    assert sorted(body["figures"]) == ["figures/semantic_sense_pairs.png", "figures/semantic_substitution.png"]
    assert all((tmp_path / f).stat().st_size > 5000 for f in body["figures"])


def test_token_identity_control(tmp_path):
    # routing follows the token id only; same-sense pairs mostly share the target token
    path = synthetic_trace(tmp_path / "trace", planted=(0, 1, 3, 4), by_token=True, ident_same=0.8, ident_diff=0.2,
                           n_pairs=600, n_items=0)
    v = analyse_trace(path, params=PARAMS).values
    assert "substitute_kappa" not in v
    for i in range(len(LAYERS)):
        assert v["difference"][i] > 0.25 and v["p_value_holm"][i] < 1e-4  # the confounded raw gap
        # means over the ~25 lemmas with identical-token pairs of both labels: a wider sampling error
        assert v["identical_tokens_same_sense_kappa"][i] == pytest.approx(0.64, abs=0.15)
        assert v["identical_tokens_different_sense_kappa"][i] == pytest.approx(0.64, abs=0.15)
        assert v["identical_tokens_difference_ci_low"][i] < 0 < v["identical_tokens_difference_ci_high"][i]
        assert v["identical_tokens_p_value"][i] > 0.01
        assert v["distinct_tokens_difference_ci_low"][i] < 0 < v["distinct_tokens_difference_ci_high"][i]


def test_mean_subword_and_incomplete_contexts():
    # two contexts; a has two target tokens, b one; a token of c lacks a layer -> c incomplete;
    # d/e: a different-sense pair of the same (unnamed) lemma, so the lemma has both labels
    contexts = pa.table({"seq_id": pa.array([0, 1, 2, 3, 4], pa.uint32()), "probe": ["wic"] * 5,
                         "item": ["p", "p", "q", "r", "r"], "role": ["a", "b", "a", "a", "b"],
                         "label": ["same"] * 3 + ["different"] * 2, "target_start": [0] * 5,
                         "target_end": [6, 3, 3, 3, 3]})
    tokens = pa.table({"seq_id": pa.array([0, 0, 0, 1, 1, 2, 3, 4], pa.uint32()),
                       "pos": pa.array([0, 1, 2, 0, 1, 0, 0, 0], pa.uint32()),
                       "token_id": pa.array([5, 6, 7, 5, 7, 5, 5, 9], pa.uint32()),
                       "char_start": pa.array([0, 3, 6, 0, 3, 0, 0, 0], pa.int32()),
                       "char_end": pa.array([3, 6, 7, 3, 4, 3, 3, 3], pa.int32())})
    targets = align_targets(tokens, contexts, "mean")
    assert targets.column("pos").to_pylist() == [0, 1, 0, 0, 0, 0]
    assert targets.column("weight").to_pylist() == [0.5, 0.5, 1, 1, 1, 1]
    routes = pa.table({"seq_id": pa.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 4, 4], pa.uint32()),
                       "pos": pa.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0], pa.uint32()),
                       "layer": pa.array([0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1], pa.uint16()),
                       "experts": [[0, 1], [0, 1], [2, 3], [0, 1], [0, 1], [0, 1], [0, 1], [4, 5], [4, 5], [6, 7],
                                   [6, 7]]})
    v = analyze_semantic(contexts, targets, routes, n_experts=E, top_k=K, layers=[0, 1], params=PARAMS).values
    e = K / E
    # layer 0: a = mean of {0,1} and {2,3}: o = 0.5; layer 1: both subwords {0,1}: o = 1
    np.testing.assert_allclose(v["same_sense_kappa"], [(0.5 - e) / (1 - e), 1.0], rtol=1e-6)
    np.testing.assert_allclose(v["different_sense_kappa"], [-e / (1 - e)] * 2, rtol=1e-6)
    assert v["n_unaligned_contexts"] == 1 and v["n_pairs_same"] == 1 and v["n_lemmas"] == 1


def test_replacements_sharing_the_first_token_are_left_out():
    # original (token 5), substitute starting with the same token 5 (identical routing by construction),
    # another substitute (token 6) and a control (token 7); one layer
    contexts = pa.table({"seq_id": pa.array([0, 1, 2, 3], pa.uint32()), "probe": ["sub"] * 4, "item": ["s"] * 4,
                         "role": ["original", "substitute", "substitute", "control"], "target_start": [0] * 4,
                         "target_end": [3] * 4})
    targets = pa.table({"seq_id": pa.array([0, 1, 2, 3], pa.uint32()), "pos": pa.array([0] * 4, pa.uint32()),
                        "token_id": pa.array([5, 5, 6, 7], pa.uint32()), "weight": pa.array([1.0] * 4, pa.float32())})
    routes = pa.table({"seq_id": pa.array([0, 1, 2, 3], pa.uint32()), "pos": pa.array([0] * 4, pa.uint32()),
                       "layer": pa.array([0] * 4, pa.uint16()), "experts": [[0, 1], [0, 1], [0, 2], [3, 4]]})
    v = analyze_semantic(contexts, targets, routes, n_experts=E, top_k=K, layers=[0], params=PARAMS).values
    e = K / E
    assert v["n_replacements_sharing_first_token"] == 1 and v["n_items"] == 1
    np.testing.assert_allclose(v["substitute_kappa"], [(0.5 - e) / (1 - e)])  # only the token-6 substitute
    np.testing.assert_allclose(v["control_kappa"], [-e / (1 - e)])


def test_lemma_confound_fools_the_unpaired_test_not_the_paired_one(tmp_path):
    # The trap: lemmas differ in baseline overlap and in their share of same-sense pairs, with no
    # sense effect inside any lemma. Over pairs (unpaired), same-sense pairs come mostly from the
    # high-overlap lemmas and look more alike; paired by lemma, there is no gap.
    path = synthetic_trace(tmp_path / "trace", planted=(1, 3), confound=True, n_pairs=600, n_items=0)
    v = analyse_trace(path, params=PARAMS).values
    for i, layer in enumerate(LAYERS):
        if layer in (1, 3):
            assert v["unpaired_difference"][i] > 0.15 and v["unpaired_p_value_holm"][i] < 1e-6
        assert v["p_value_holm"][i] > 0.05 and v["difference_ci_low"][i] < 0 < v["difference_ci_high"][i]
    assert v["n_lemmas"] >= 30 and len(v["lemma_gaps"]["lemmas"]) == v["n_lemmas"]


def test_random_init_control_tests_the_difference_of_gaps(tmp_path):
    from moescope.analysis.semantic_control import random_init_control

    # "trained": a sense effect in layers 1 and 3; "random" copies: the same probes, no effect anywhere
    # (the same probe sentences, routed with another seed each)
    trained = analyse_trace(synthetic_trace(tmp_path / "t", planted=(1, 3)), params=PARAMS).values
    randoms = [analyse_trace(synthetic_trace(tmp_path / f"r{s}", planted=(), route_seed=s), params=PARAMS).values
               for s in range(3)]
    c = random_init_control(trained, randoms, [0, 1, 2], n_boot=500)
    assert c["random_init_seeds"] == [0, 1, 2] and c["n_lemmas_trained_vs_random"] == 40
    assert np.asarray(c["random_init_difference_per_seed"]).shape == (3, len(LAYERS))
    for i, layer in enumerate(LAYERS):
        if layer in (1, 3):
            assert c["trained_minus_random_difference_ci_low"][i] > 0.4
            assert c["trained_minus_random_p_value_holm"][i] < 1e-5
            assert c["substitution_trained_minus_random_p_value_holm"][i] < 1e-5
        else:
            assert c["trained_minus_random_p_value_holm"][i] > 0.05
            assert c["substitution_trained_minus_random_p_value_holm"][i] > 0.05
    # a "trained" model no different from its random copies: nothing
    same = random_init_control(randoms[0], randoms[1:], [1, 2], n_boot=500)
    assert np.all(np.asarray(same["trained_minus_random_p_value_holm"]) > 0.05)
