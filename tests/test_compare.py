"""Compare analysis: closed-form chance, token alignment, and a planted expert permutation recovered."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import typer
from typer.testing import CliRunner

import moescope
from moescope.analysis import routing_sets as rs
from moescope.analysis.chat_template import DEFAULT_TEMPLATE, render_chat
from moescope.analysis.routing_inputs import compare_traces
from moescope.errors import MoescopeError
from moescope.store.tables import write_trace

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """One BLAS thread: on a shared 2-core machine threaded BLAS calls mostly wait on each other."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield

E, K, LAYERS = 16, 2, [0, 1, 2]


def _topk_random(rng: np.random.Generator, n: int, n_experts: int = E) -> np.ndarray:
    # skewed loads (a realistic router is not uniform), k distinct experts per token
    scores = rng.random((n, n_experts)) * np.linspace(1.0, 2.0, n_experts)
    return np.argsort(-scores, axis=1)[:, :K]


def _write(path, texts, tokens, experts_by_layer, n_experts=E):
    """tokens: dict of numpy arrays (seq_id, pos, token_id, phase, char_start, char_end)."""
    n = len(tokens["seq_id"])
    layers = sorted(experts_by_layer)
    routes = pa.table({
        "seq_id": np.tile(tokens["seq_id"], len(layers)).astype(np.uint32),
        "pos": np.tile(tokens["pos"], len(layers)).astype(np.uint32),
        "layer": np.repeat(layers, n).astype(np.uint16),
        "experts": pa.array([list(r) for layer in layers for r in experts_by_layer[layer].astype(np.uint8)],
                            pa.list_(pa.uint8())),
    })
    tok = pa.table({"seq_id": tokens["seq_id"].astype(np.uint32), "pos": tokens["pos"].astype(np.uint32),
                    "token_id": tokens["token_id"].astype(np.uint32), "phase": tokens["phase"],
                    "char_start": tokens["char_start"].astype(np.int32), "char_end": tokens["char_end"].astype(np.int32)})
    seqs = pa.table({"seq_id": np.arange(len(texts), dtype=np.uint32), "text": texts})
    write_trace(path, routes=routes, tokens=tok, sequences=seqs, overwrite=True,
                model={"n_experts": n_experts, "top_k": K, "moe_layers": layers})
    return path


def _corpus(n_seq=60, words=30, n_gen=5, seed=0):
    """Texts of 'wNN ' words, one token per character span of a word or space, plus generated tokens."""
    rng = np.random.default_rng(seed)
    texts, cols = [], {k: [] for k in ("seq_id", "pos", "token_id", "phase", "char_start", "char_end")}
    for s in range(n_seq):
        ids = rng.integers(0, 100, words)
        text, pos = "", 0
        for w in ids:
            for piece, tid in ((f"w{w:02d}", int(w)), (" ", 100)):
                for key, value in zip(cols, (s, pos, tid, "prompt", len(text), len(text) + len(piece))):
                    cols[key].append(value)
                text += piece
                pos += 1
        for g in range(n_gen):
            for key, value in zip(cols, (s, pos, 101 + g, "generated", -1, -1)):
                cols[key].append(value)
            pos += 1
        texts.append(text)
    return texts, {k: np.array(v) for k, v in cols.items()}


@pytest.fixture(scope="module")
def permuted(tmp_path_factory):
    """A, and B = A with experts relabelled by a known permutation per layer and 10% of tokens re-drawn."""
    rng = np.random.default_rng(7)
    texts, tokens = _corpus()
    n = len(tokens["seq_id"])
    a = {layer: _topk_random(rng, n) for layer in LAYERS}
    perms = {layer: rng.permutation(E) for layer in LAYERS}
    b = {}
    for layer in LAYERS:
        relabelled = perms[layer][a[layer]]
        noisy = rng.random(n) < 0.10
        relabelled[noisy] = _topk_random(rng, int(noisy.sum()))
        b[layer] = relabelled
    root = tmp_path_factory.mktemp("cmp")
    ta = _write(root / "a", texts, tokens, a)
    tb = _write(root / "b", texts, tokens, b)
    return ta, tb, perms


def test_closed_form_chance_matches_simulation():
    rng = np.random.default_rng(0)
    assert rs.share_at_least_one_chance(64, 8) == pytest.approx(1 - math.comb(56, 8) / math.comb(64, 8))
    assert rs.share_at_least_one_chance(64, 8) == pytest.approx(0.679, abs=5e-4)  # "0.67" in the paper, truncated
    a = np.argsort(rng.random((50_000, 64)), axis=1)[:, :8]
    b = np.argsort(rng.random((50_000, 64)), axis=1)[:, :8]
    inter = rs.intersections(a, b)
    assert (inter > 0).mean() == pytest.approx(rs.share_at_least_one_chance(64, 8), abs=0.01)
    assert inter.mean() / 8 == pytest.approx(rs.expected_overlap_chance(64, 8), abs=0.003)
    assert (1 - 2 * (8 - inter) / 64).mean() == pytest.approx(rs.hamming_chance(64, 8), abs=0.003)
    assert rs.load_aware_overlap_chance(rs.usage(a, 64), rs.usage(b, 64), 8) == pytest.approx(8 / 64, abs=0.002)


def test_planted_permutation_is_recovered_exactly(permuted):
    ta, tb, perms = permuted
    v = compare_traces(moescope.open_trace(ta), moescope.open_trace(tb), seed=3).values
    assert v["alignment"]["mode"] == "token"
    assert v["alignment"]["share_prompt_matched_a"] == 1.0
    for i, layer in enumerate(LAYERS):
        assert v["expert_matching"][i] == perms[layer].tolist()
        assert v["per_layer_overlap"][i] < v["per_layer_load_chance"][i] + 0.05  # raw ids: chance
        assert v["per_layer_overlap_matched"][i] > 0.88
        assert v["per_layer_overlap_matched_crossfit"][i] > 0.88
        assert v["per_layer_matched_chance"][i] < 0.25  # the matching alone does not make overlap
        assert v["per_layer"][i]["matching_fold_agreement"] == 1.0
    assert v["expected_overlap_chance"] == K / E
    assert set(v["by_phase"]) >= {"prompt", "generated"}
    assert len(v["by_phase"]["generated"]["per_layer_overlap"]) == len(LAYERS)


def test_identical_traces_overlap_fully_and_shuffled_traces_sit_at_chance(tmp_path):
    rng = np.random.default_rng(1)
    texts, tokens = _corpus(n_seq=40, seed=2)
    n = len(tokens["seq_id"])
    a = {layer: _topk_random(rng, n) for layer in LAYERS}
    ta = _write(tmp_path / "a", texts, tokens, a)
    same = compare_traces(moescope.open_trace(ta), moescope.open_trace(ta)).values
    assert same["per_layer_overlap"] == [1.0] * 3 and same["per_layer_share_at_least_one"] == [1.0] * 3
    assert same["expert_matching"][0] == list(range(E))
    indep = _write(tmp_path / "c", texts, tokens, {layer: _topk_random(rng, n) for layer in LAYERS})
    v = compare_traces(moescope.open_trace(ta), moescope.open_trace(indep)).values
    for i in range(3):
        assert abs(v["per_layer_overlap"][i] - v["per_layer_load_chance"][i]) < 0.02
        assert abs(v["per_layer_overlap_matched_crossfit"][i] - v["per_layer_matched_chance"][i]) < 0.03
        # in-sample matching is optimistic; cross-fitting removes most of it
        assert v["per_layer_overlap_matched"][i] >= v["per_layer_overlap_matched_crossfit"][i]


def test_token_identity_null_explains_token_routing_but_not_context_routing(tmp_path):
    """Trap: both models route by token id alone (B: another labelling of the same function of
    the id): the raw matched overlap is high, the token-id null reaches it. Planted: both route
    by a per-token context variable (not the id): matched overlap beyond the token-id null."""
    rng = np.random.default_rng(4)
    texts, tokens = _corpus(n_seq=40, seed=5)
    n = len(tokens["seq_id"])
    by_id = _topk_random(rng, 200)  # one expert set per token id
    context = _topk_random(rng, n)  # one expert set per token occurrence
    perm = rng.permutation(E)
    layers_a = {0: by_id[tokens["token_id"]], 1: context}
    layers_b = {0: perm[by_id[tokens["token_id"]]], 1: perm[context]}
    ta = _write(tmp_path / "a", texts, tokens, layers_a)
    tb = _write(tmp_path / "b", texts, tokens, layers_b)
    v = compare_traces(moescope.open_trace(ta), moescope.open_trace(tb), seed=1).values
    real, null = v["per_layer_overlap_matched_crossfit"], v["per_layer_overlap_matched_token_null"]
    sd, p = v["per_layer_matched_chance_sd"], v["per_layer_overlap_matched_token_null_p"]
    assert real[0] > 0.9 and real[0] > v["per_layer_matched_chance"][0] + 0.5  # the old reading: "models agree"
    assert null[0] == pytest.approx(real[0], abs=0.02) and p[0] > 0.2  # token identity explains it
    # context agreement stays; the sequential p draws shuffles until Holm over the 2 layers can
    # reach 0.05 (2 / 0.05 - 1 = 39), while the token-routed layer stops once 10 shuffles reach it
    assert real[1] > 0.9 and null[1] < 0.5 and p[1] == pytest.approx(1 / 40)
    assert v["per_layer"][1]["matched_token_null_p_holm"] == pytest.approx(2 / 40)
    assert v["per_layer_token_null_shuffles"][1] == 39 and v["per_layer_token_null_shuffles"][0] <= 20
    assert all(s is not None and s >= 0 for s in sd) and v["per_layer"][0]["shuffles"] == 20


def _split_tokens(tokens):
    """Another tokenizer: every 'wNN' word becomes two tokens 'w' + 'NN'; spaces stay single tokens."""
    out = {k: [] for k in tokens}
    pos = {}
    for i in range(len(tokens["seq_id"])):
        s, start, end = tokens["seq_id"][i], tokens["char_start"][i], tokens["char_end"][i]
        pieces = [(start, start + 1), (start + 1, end)] if end - start == 3 else [(start, end)]
        for a, b in pieces:
            p = pos.get(s, 0)
            pos[s] = p + 1
            for key, value in zip(out, (s, p, 500 + tokens["token_id"][i], tokens["phase"][i], a, b)):
                out[key].append(value)
    return {k: np.array(v) for k, v in out.items()}


def test_different_tokenizers_align_by_character_spans(tmp_path):
    rng = np.random.default_rng(4)
    texts, tokens = _corpus(n_seq=20, n_gen=3, seed=5)
    other = _split_tokens(tokens)
    ea = {layer: _topk_random(rng, len(tokens["seq_id"])) for layer in LAYERS}
    # B routes the tokens that keep A's exact span (the spaces) as A does, the rest at random
    eb = {}
    for layer in LAYERS:
        e = _topk_random(rng, len(other["seq_id"]))
        key_a = {(s, a, b): i for i, (s, a, b) in enumerate(zip(tokens["seq_id"], tokens["char_start"], tokens["char_end"]))
                 if a >= 0}
        for j, key in enumerate(zip(other["seq_id"], other["char_start"], other["char_end"])):
            if key in key_a:
                e[j] = ea[layer][key_a[key]]
        eb[layer] = e
    ta = _write(tmp_path / "a", texts, tokens, ea)
    tb = _write(tmp_path / "b", texts, other, eb)
    v = compare_traces(moescope.open_trace(ta), moescope.open_trace(tb)).values
    align = v["alignment"]
    assert align["mode"] == "char" and align["same_vocabulary"] is False
    assert align["share_prompt_matched_a"] == pytest.approx(0.5)  # the spaces: half of A's prompt tokens
    assert align["n_generated_aligned"] == 0 and any("generated" in n for n in align["notes"])
    assert v["per_layer_overlap"] == [1.0] * 3


def test_chat_template_text_is_aligned_inside_the_longer_text(tmp_path):
    rng = np.random.default_rng(6)
    texts, tokens = _corpus(n_seq=15, n_gen=4, seed=8)
    prefix = "User: "
    chat_texts = [render_chat(t, None, None) for t in texts]
    assert chat_texts[0].startswith(prefix) and DEFAULT_TEMPLATE.startswith(prefix)
    shifted = {k: v.copy() for k, v in tokens.items()}
    prompt = shifted["phase"] == "prompt"
    shifted["char_start"][prompt] += len(prefix)
    shifted["char_end"][prompt] += len(prefix)
    shifted["pos"] = shifted["pos"] + 2  # two template tokens first (not in the tables: positions still align)
    ea = {layer: _topk_random(rng, len(tokens["seq_id"])) for layer in LAYERS}
    ta = _write(tmp_path / "plain", texts, tokens, ea)
    tb = _write(tmp_path / "chat", chat_texts, shifted, ea)
    v = compare_traces(moescope.open_trace(ta), moescope.open_trace(tb)).values
    align = v["alignment"]
    assert align["mode"] == "char" and align["texts"] == "A inside B"
    assert align["share_prompt_matched_a"] == 1.0
    assert align["n_generated_aligned"] == 15 * 4 and align["generated_same_token_share"] == 1.0
    assert v["per_layer_overlap"] == [1.0] * 3
    assert v["deep_vs_shallow"]["generated"]["deep_overlap"] == 1.0


def test_refusals_are_one_line(tmp_path):
    rng = np.random.default_rng(9)
    texts, tokens = _corpus(n_seq=5, seed=1)
    ea = {layer: _topk_random(rng, len(tokens["seq_id"])) for layer in LAYERS}
    ta = _write(tmp_path / "a", texts, tokens, ea)
    other_texts = [t.replace("w", "x") for t in texts]
    tb = _write(tmp_path / "b", other_texts, tokens, ea)
    with pytest.raises(MoescopeError, match="different texts") as exc:
        compare_traces(moescope.open_trace(ta), moescope.open_trace(tb))
    assert "\n" not in str(exc.value)
    small = {layer: _topk_random(rng, len(tokens["seq_id"]), 8) % 8 for layer in LAYERS}
    tc = _write(tmp_path / "c", texts, tokens, small, n_experts=8)
    with pytest.raises(MoescopeError, match="same E and k"):
        compare_traces(moescope.open_trace(ta), moescope.open_trace(tc))
    no_offsets = _split_tokens(tokens)
    no_offsets["char_start"][:] = -1
    no_offsets["char_end"][:] = -1
    td = _write(tmp_path / "d", texts, no_offsets,
                {layer: _topk_random(rng, len(no_offsets["seq_id"])) for layer in LAYERS})
    with pytest.raises(MoescopeError, match="character offsets"):
        compare_traces(moescope.open_trace(ta), moescope.open_trace(td))


def _app():
    from moescope.commands import analyze_compare

    app, analyze = typer.Typer(), typer.Typer()
    app.add_typer(analyze, name="analyze")
    analyze_compare.register(app, analyze_app=analyze)
    return app


def test_compare_command_writes_the_documented_keys(permuted, tmp_path):
    ta, tb, perms = permuted
    run = CliRunner().invoke(_app(), ["analyze", "compare", str(ta), str(tb), "--out", str(tmp_path / "o")],
                             standalone_mode=False)
    assert run.exception is None, run.output
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["analysis"] == "compare"
    for key in ("per_layer_overlap", "per_layer_overlap_matched", "expert_matching"):
        assert len(saved[key]) == len(LAYERS)
    assert saved["expert_matching"][1] == perms[1].tolist()
    assert saved["expected_overlap_chance"] == K / E
    assert len(saved["per_layer_overlap_matched_token_null"]) == len(LAYERS)
    assert saved["traces"]["a"]["path"] == str(ta) and saved["traces"]["b"]["path"] == str(tb)
    assert "matched chance" in run.output and "prompt" in run.output
    assert saved["share_at_least_one_chance"] == pytest.approx(rs.share_at_least_one_chance(E, K))
    import jinja2

    from moescope.report.sections.compare import render

    section = render(saved, tmp_path / "o", jinja2.Environment(autoescape=True))
    assert "chance" in section.summary and "data:image/png" in section.html


def test_chat_template_command_on_a_tiny_model(tiny_dir, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\nWhat is 12 times 7?\n"
                    "Once upon a time a lighthouse keeper watched the sea.\n", encoding="utf-8")
    run = CliRunner().invoke(_app(), ["analyze", "chat-template", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "ct"), "--generate", "3", "--template",
                                      "Question: {text}\\nAnswer:"], standalone_mode=False)
    assert run.exception is None, run.output
    saved = json.loads((tmp_path / "ct" / "results.json").read_text())
    assert saved["params"]["kind"] == "chat-template" and saved["params"]["template"] == "Question: {text}\nAnswer:"
    align = saved["alignment"]
    assert align["texts"] == "A inside B" and align["share_prompt_matched_a"] > 0.8
    assert align["n_generated_aligned"] == 3 * 3
    assert len(saved["per_layer_overlap"]) == 3 and "generated" in saved["by_phase"]
    chat = (tmp_path / "ct" / "data" / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(chat[1])["text"] == "Question: What is 12 times 7?\nAnswer:"
