"""Engine responses as the engines write them -> traces; replay; agreement (known answers).

Fixtures follow the engines' code (see tests/engine_responses.py for the file each mirrors).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moescope
from engine_responses import (
    b64_npy,
    engine_array,
    sglang_generate_line,
    trace_sequences,
    vllm_line,
    vllm_split_line,
)
from moescope.analysis.agreement import AgreementCounts, count_agreement
from moescope.analysis.agreement_run import agreement
from moescope.errors import DataError, MoescopeError
from moescope.importers.common import import_requests
from moescope.importers.engine_model import describe_engine_model
from moescope.importers.sglang import SglangSource
from moescope.importers.vllm import VllmSource
from moescope.store.validate import validate

MOESCOPE = [sys.executable, "-m", "moescope.cli"]


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """A Qwen2-MoE config whose decoder layer 1 is dense (mlp_only_layers): 4 layers, MoE at 0, 2, 3."""
    from moescope.testing.tiny import tiny_config

    path = tmp_path_factory.mktemp("qwen2moe-config")
    tiny_config("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[1]).save_pretrained(path)
    return describe_engine_model(str(path), with_tokenizer=False)


def _random_moe_rows(rng, n: int, model) -> np.ndarray:
    return np.stack([np.stack([rng.choice(model.n_experts, model.top_k, replace=False)
                               for _ in model.moe_layers]) for _ in range(n)])


def _routes(trace) -> dict:
    return {(s, p, layer): sorted(e) for s, p, layer, e in trace.rows("SELECT seq_id, pos, layer, experts FROM routes")}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return path


def test_vllm_forms_dense_layers_offsets_and_n_choices(tmp_path, dense_model):
    assert dense_model.moe_layers == [0, 2, 3] and dense_model.n_layers == 4
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, 90, 6).tolist()
    outs = [rng.integers(5, 90, 4).tolist(), rng.integers(5, 90, 3).tolist()]
    moe = [_random_moe_rows(rng, len(prompt) + len(o), dense_model) for o in outs]
    full = [engine_array(m, 4, dense_model.moe_layers) for m in moe]
    lines = [vllm_line("chat-1", prompt, list(zip(outs, full)), form="chat", dtype=np.uint8),  # n = 2, .npy
             vllm_line("cmpl-2", prompt, [(outs[0], full[0])], form="completions", encoding="lists"),
             vllm_line("chat-3", prompt, [(outs[0], full[0])], prompt_start=2),
             vllm_split_line("v021-4", prompt, outs[0], full[0], cached=2)]
    src = _write(tmp_path / "responses.jsonl", lines)
    manifest = import_requests(VllmSource([src], dense_model), tmp_path / "t", model=dense_model)
    assert manifest["model"]["moe_layers"] == [0, 2, 3] and manifest["model"]["n_layers"] == 4
    assert manifest["capture"]["expert_ids"] == "logical"
    trace = moescope.open_trace(tmp_path / "t")
    assert validate(trace).ok
    got = _routes(trace)
    assert {layer for _, _, layer in got} == {0, 2, 3}  # the dense layer has no rows
    seqs = trace.rows("SELECT seq_id, request_id, choice_index, routing_start FROM sequences ORDER BY seq_id")
    assert seqs == [(0, "chat-1", 0, 0), (1, "chat-1", 1, 0), (2, "cmpl-2", 0, 0), (3, "chat-3", 0, 2),
                    (4, "v021-4", 0, 0)]
    expected_first_pos = {0: 0, 1: 0, 2: 0, 3: 2, 4: 2}  # prompt offset; v0.21's -1 prefix-cache rows
    which = {0: 0, 1: 1, 2: 0, 3: 0, 4: 0}
    for s in range(5):
        m, n_fed = moe[which[s]], len(prompt) + len(outs[which[s]]) - 1
        want = {(s, p, layer): sorted(m[p, li].tolist()) for p in range(expected_first_pos[s], n_fed)
                for li, layer in enumerate(dense_model.moe_layers)}
        assert {key: v for key, v in got.items() if key[0] == s} == want  # the last token: no routes row
    phases = trace.rows("SELECT phase, count(*) FROM tokens WHERE seq_id = 1 GROUP BY phase ORDER BY phase")
    assert phases == [("generated", 3), ("prompt", 6)]


def test_sglang_generate_form_with_start_len(tmp_path, dense_model):
    rng = np.random.default_rng(1)
    lines = []
    moe_all = []
    for i, start in enumerate((0, 3)):
        prompt, out = rng.integers(5, 90, 5).tolist(), rng.integers(5, 90, 3).tolist()
        moe = _random_moe_rows(rng, 8, dense_model)
        moe_all.append(moe)
        lines.append(sglang_generate_line(f"rid-{i}", prompt, out, engine_array(moe, 4, [0, 2, 3]), start_len=start))
    src = _write(tmp_path / "gen.jsonl", [lines[0], [lines[1], lines[0]]])  # a batch request answers with a list
    import_requests(SglangSource([src], dense_model), tmp_path / "t", model=dense_model)
    trace = moescope.open_trace(tmp_path / "t")
    got = _routes(trace)
    for s, (which, start) in enumerate(((0, 0), (1, 3), (0, 0))):
        want = {(s, p, layer): sorted(moe_all[which][p, li].tolist()) for p in range(start, 7)
                for li, layer in enumerate([0, 2, 3])}
        assert {key: v for key, v in got.items() if key[0] == s} == want
    assert trace.rows("SELECT request_id FROM sequences ORDER BY seq_id") == [("rid-0",), ("rid-1",), ("rid-0",)]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["choices"][0].update(routed_experts=b64_npy(np.zeros((8, 5, 3), np.int32))), "5 layers"),
    (lambda d: d["choices"][0].update(routed_experts=b64_npy(np.zeros((9, 4, 3), np.int32))), "9 routing rows"),
    (lambda d: d["choices"][0].update(routed_experts=b64_npy(np.zeros((8, 4, 2), np.int32))), "top_k = 3"),
    (lambda d: d["choices"][0].update(routed_experts=None), "enable-return-routed-experts"),
    (lambda d: d["choices"][0].update(routed_experts="not base64!"), "not base64"),
    (lambda d: d.pop("prompt_token_ids"), "prompt_token_ids"),
])
def test_vllm_wrong_shapes_refused_with_line_number(tmp_path, dense_model, mutate, message):
    rng = np.random.default_rng(2)
    prompt, out = rng.integers(5, 90, 5).tolist(), rng.integers(5, 90, 4).tolist()
    full = engine_array(_random_moe_rows(rng, 9, dense_model), 4, [0, 2, 3])
    good = vllm_line("a", prompt, [(out, full)])
    bad = json.loads(json.dumps(good))
    mutate(bad)
    src = _write(tmp_path / "r.jsonl", [good, bad])
    with pytest.raises(DataError, match=message) as err:
        import_requests(VllmSource([src], dense_model), tmp_path / "t", model=dense_model)
    assert "line 2" in str(err.value)


def test_sglang_raw_bytes_that_do_not_fit_and_cli_errors(tmp_path, dense_model):
    line = sglang_generate_line("x", [5, 6, 7], [8, 9], np.zeros((4, 4, 3), np.int32))
    line["meta_info"]["routed_experts"] = line["meta_info"]["routed_experts"][:-8]  # 5 int32 short... of a row
    with pytest.raises(DataError, match="line 1"):
        import_requests(SglangSource([_write(tmp_path / "g.jsonl", [line])], dense_model), tmp_path / "t",
                        model=dense_model)
    wrong = sglang_generate_line("y", [5, 6, 7], [8, 9], np.zeros((4, 4, 3), np.int32))
    wrong["meta_info"]["prompt_tokens"] = 4  # the saved input_ids are not the request's
    with pytest.raises(DataError, match="line 1: meta_info.prompt_tokens is 4"):
        import_requests(SglangSource([_write(tmp_path / "w.jsonl", [wrong])], dense_model), tmp_path / "tw",
                        model=dense_model)
    with pytest.raises(DataError, match="--model"):
        SglangSource([tmp_path / "g.jsonl"])
    r = subprocess.run(MOESCOPE + ["import", "sglang", str(tmp_path / "g.jsonl"), "--out", str(tmp_path / "u")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--model" in r.stderr and "Traceback" not in r.stderr and "pickle" not in r.stderr


@pytest.fixture(scope="module")
def round_trip(tiny_dir, tmp_path_factory):
    """capture (generate) with transformers -> vLLM and SGLang responses -> import -> replay."""
    from moescope.capture.dataset import RunOptions, capture_dataset
    from moescope.capture.loading import load_model
    from moescope.capture.recorder import CaptureOptions
    from moescope.capture.replay import replay_trace

    work = tmp_path_factory.mktemp("engine-round-trip")
    (work / "p.txt").write_text("The quick brown fox\nWhat is 12 times 7?\nOnce upon a time\n")
    hf_model, tokenizer = load_model(str(tiny_dir))
    logits = CaptureOptions(router_scores="logits")
    capture_dataset(hf_model, tokenizer, work / "p.txt", work / "cap", options=logits, run=RunOptions(generate=4))
    cap = moescope.open_trace(work / "cap")
    model = describe_engine_model(str(tiny_dir))
    vllm_lines, sglang_lines = [], []
    for i, s in enumerate(trace_sequences(cap)):
        full = engine_array(s["routing"].astype(np.int32), model.n_layers, model.moe_layers)
        vllm_lines.append(vllm_line(f"r{i}", s["prompt"], [(s["output"], full)]))
        sglang_lines.append(sglang_generate_line(f"r{i}", s["prompt"], s["output"], full))
    _write(work / "vllm.jsonl", vllm_lines)
    _write(work / "sglang.jsonl", sglang_lines)
    from moescope.cli import main

    argv, sys.argv = sys.argv, ["moescope", "import", "vllm", str(work / "vllm.jsonl"), "--model", str(tiny_dir),
                                "--out", str(work / "vllm")]
    try:  # the command line, in this process (a new interpreter costs seconds)
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        sys.argv = argv
    import_requests(SglangSource([work / "sglang.jsonl"], model), work / "sglang", model=model)
    replay_trace(hf_model, tokenizer, work / "vllm", work / "replay", options=logits)
    return work


def test_round_trip_agreement_is_one(round_trip):
    work = round_trip
    imported = moescope.open_trace(work / "vllm")
    assert imported.scalar("SELECT count(*) FROM tokens WHERE token IS NULL") == 0  # texts from the tokenizer
    captured_texts = moescope.open_trace(work / "cap").rows("SELECT text FROM sequences ORDER BY seq_id")
    assert imported.rows("SELECT text FROM sequences ORDER BY seq_id") == captured_texts  # the decoded prompts
    replay = moescope.open_trace(work / "replay")
    assert replay.manifest["capture"]["mode"] == "replay"
    # phases kept: the replay labels exactly the tokens the capture generated as generated
    q = "SELECT seq_id, pos, phase FROM tokens ORDER BY seq_id, pos"
    assert replay.rows(q) == moescope.open_trace(work / "cap").rows(q)
    for other in ("vllm", "sglang"):
        v = agreement(moescope.open_trace(work / other), replay, figures=False).values
        assert v["n_tokens_unaligned"] == 0 and v["n_tokens_compared"] > 0
        assert v["per_layer_set_agreement"] == [1.0] * len(v["moe_layers"])
        assert v["by_phase"]["generated"]["set_agreement"] == 1.0
        assert set(v["per_layer_rows_only_b"]) == {3}  # the last token of each sequence: never fed to the engine
    # engine ids come in the router's order, captures by weight: the same first expert here
    assert v["per_layer_top1_agreement"] == [1.0] * len(v["moe_layers"])
    assert "margin" in v


def test_agreement_cli_and_report_section(round_trip, tmp_path, capsys):
    from test_cli_errors import run_cli

    code, err = run_cli(["analyze", "agreement", str(round_trip / "vllm"), str(round_trip / "replay"),
                         "--out", str(tmp_path / "agr")], capsys)
    assert code in (0, None), err
    values = json.loads((tmp_path / "agr" / "results.json").read_text())
    for key in ("moe_layers", "n_tokens_compared", "n_tokens_unaligned", "per_layer_set_agreement",
                "per_layer_top1_agreement", "per_layer_mean_overlap"):
        assert key in values
    from jinja2 import Environment

    from moescope.report.sections import renderer

    values["worst_tokens"] = [{"seq_id_a": 0, "seq_id_b": 0, "pos": 1, "phase": "prompt",
                               "token": "<script>alert(1)</script>", "n_layers_disagree": 2}]
    values["notes"] = ["<b>hostile</b>"]
    section = renderer("agreement")(values, tmp_path / "agr", Environment(autoescape=True))
    assert "Routing agreement" in section.title and "<table" in section.html
    assert "<script>" not in section.html and "<b>hostile" not in section.html  # every text escaped


def test_agreement_known_answers():
    """Planted: flips only at small margins are found there; null: identical routing agrees 1.0;
    trap: the same sets in another order are not disagreements."""
    rng = np.random.default_rng(3)
    n, k, e = 2000, 2, 8
    a = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    keys = np.arange(n, dtype=np.int64) << 12
    margin = rng.exponential(0.5, n).astype(np.float32)
    b = a.copy()
    flip = margin < 0.01
    b[flip, 1] = (a[flip, 1] + 1 + (a[flip, 0] == (a[flip, 1] + 1) % e)) % e  # change the second expert
    b[flip, 1] = np.where(b[flip, 1] == a[flip, 0], (b[flip, 1] + 1) % e, b[flip, 1])
    common = dict(layer_index_a=np.zeros(n, int), layer_index_b=np.zeros(n, int), n_layers=1,
                  pos_a=np.arange(n), phase_a=np.zeros(n, np.int8))
    c = count_agreement(keys, a, keys, b, margin_a=margin, **common)
    assert c.n[0] == n and c.set_equal[0] == n - flip.sum() and flip.sum() > 0
    mismatches = c.margin_n[:, 0] - c.margin_set_equal[:, 0]
    assert mismatches[:3].sum() == flip.sum() and mismatches[3:].sum() == 0  # all below a margin of 0.01
    same = count_agreement(keys, a, keys, a[:, ::-1].copy(), **common)  # the trap: order differs, sets do not
    assert same.set_equal[0] == n and same.top1_equal[0] < n
    half = count_agreement(keys[: n // 2], a[: n // 2], keys[: n // 2], a[: n // 2], **{
        **common, "layer_index_a": np.zeros(n // 2, int), "layer_index_b": np.zeros(n // 2, int),
        "pos_a": np.arange(n // 2), "phase_a": np.zeros(n // 2, np.int8)})
    rest = count_agreement(keys[n // 2:], a[n // 2:], keys[n // 2:], a[n // 2:], **{
        **common, "layer_index_a": np.zeros(n - n // 2, int), "layer_index_b": np.zeros(n - n // 2, int),
        "pos_a": np.arange(n // 2, n), "phase_a": np.zeros(n - n // 2, np.int8)})
    whole = count_agreement(keys, a, keys, a, **common)
    merged = half.merge(rest)
    assert isinstance(merged, AgreementCounts)
    assert all(np.array_equal(getattr(merged, f), getattr(whole, f)) for f in ("n", "set_equal", "position_n"))


def test_agreement_refuses_physical_ids(round_trip, tmp_path):
    import shutil

    from moescope.store.manifest import read_manifest, write_manifest

    copy = tmp_path / "phys"
    shutil.copytree(round_trip / "vllm", copy)
    m = read_manifest(copy)
    m["capture"]["expert_ids"] = "physical"
    write_manifest(copy, m)
    with pytest.raises(MoescopeError, match="physical"):
        agreement(moescope.open_trace(copy), moescope.open_trace(round_trip / "replay"), figures=False)


def test_sglang_dump_forward_mode_labels_mixed_passes_and_replay_refuses_segments(tmp_path):
    """SGLang's ForwardMode (forward_batch_info.py: EXTEND=1, DECODE=2, MIXED=3): a mixed pass
    appends the running decode requests, one token each, after the prefill chunk."""
    import torch

    from moescope.capture.replay import source_sequences
    from test_importers import sglang_dump

    dump = sglang_dump()
    mixed = dump["records"][2]
    mixed.update(forward_mode=3, extend_seq_lens=[2, 1, 1], positions=[0, 1, 17, 9])
    torch.save(dump, tmp_path / "d.pt")
    import_requests(SglangSource([tmp_path / "d.pt"]), tmp_path / "t", used_slots_only=True, n_experts=8)
    trace = moescope.open_trace(tmp_path / "t")
    got = trace.rows("SELECT s.segment, t.phase FROM tokens t JOIN sequences s USING (seq_id) "
                     "WHERE s.forward_pass_id = 2 ORDER BY s.segment, t.pos")
    assert got == [(0, "prompt"), (0, "prompt"), (1, "generated"), (2, "generated")]
    with pytest.raises(DataError, match="positions 0"):
        source_sequences(tmp_path / "t")  # decode segments start mid-request: nothing to replay them from
    dump["records"][1]["forward_mode"] = 5  # TARGET_VERIFY: speculative tokens that may never be accepted
    torch.save(dump, tmp_path / "spec.pt")
    with pytest.raises(DataError, match="speculative"):
        import_requests(SglangSource([tmp_path / "spec.pt"]), tmp_path / "t2", used_slots_only=True, n_experts=8)


def test_cli_errors_of_replay_and_agreement(round_trip, tiny_dir, tmp_path, capsys):
    from test_cli_errors import assert_one_line_error, run_cli

    from moescope.capture.dataset import capture_dataset
    from moescope.capture.loading import load_model

    code, err = run_cli(["capture", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "--data", "--replay")
    code, err = run_cli(["capture", "--replay", str(round_trip / "vllm"), "--data", str(round_trip / "p.txt"),
                         "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "either")
    other = tmp_path / "other.txt"
    other.write_text("Completely different words here\n")
    model, tok = load_model(str(tiny_dir))
    capture_dataset(model, tok, other, tmp_path / "other")
    code, err = run_cli(["analyze", "agreement", str(round_trip / "vllm"), str(tmp_path / "other"),
                         "--out", str(tmp_path / "agr")], capsys)
    assert_one_line_error(code, err, "same token ids")


def test_sglang_openai_form_routing_of_the_first_choice(tmp_path, dense_model):
    """SGLang serving_chat.py: ``sglext.routed_experts`` at the response level, from ret[0] only."""
    from engine_responses import b64_raw_int32

    rng = np.random.default_rng(5)
    prompt, outs = rng.integers(5, 90, 4).tolist(), [rng.integers(5, 90, 3).tolist() for _ in range(2)]
    moe = _random_moe_rows(rng, 7, dense_model)
    line = {"id": "chatcmpl-s", "object": "chat.completion", "input_ids": prompt,
            "choices": [{"index": i, "message": {"role": "assistant", "content": "x"}, "token_ids": o,
                         "finish_reason": "length"} for i, o in enumerate(outs)],
            "sglext": {"routed_experts": b64_raw_int32(engine_array(moe, 4, [0, 2, 3])[:6])}}
    with pytest.warns(UserWarning, match="first choice only"):
        import_requests(SglangSource([_write(tmp_path / "o.jsonl", [line])], dense_model), tmp_path / "t",
                        model=dense_model)
    trace = moescope.open_trace(tmp_path / "t")
    assert trace.rows("SELECT seq_id, request_id, choice_index FROM sequences") == [(0, "chatcmpl-s", 0)]
    assert _routes(trace)[(0, 5, 3)] == sorted(moe[5, 2].tolist())


def test_unwritten_rows_are_left_out_with_a_warning(tmp_path, dense_model):
    rng = np.random.default_rng(6)
    prompt, out = rng.integers(5, 90, 4).tolist(), rng.integers(5, 90, 2).tolist()
    full = engine_array(_random_moe_rows(rng, 6, dense_model), 4, [0, 2, 3])
    full[1, 2] = 0  # MoE layer 2 at position 1: the buffer's zeros, never written
    src = _write(tmp_path / "r.jsonl", [vllm_line("a", prompt, [(out, full)])])
    with pytest.warns(UserWarning, match="unwritten engine buffer"):
        import_requests(VllmSource([src], dense_model), tmp_path / "t", model=dense_model)
    got = _routes(moescope.open_trace(tmp_path / "t"))
    assert (0, 1, 2) not in got and (0, 1, 3) in got and (0, 2, 2) in got


def test_agreement_aligns_by_token_ids_and_stops_where_generations_diverge(tmp_path):
    """The trap: same routing on the shared prefix, different tokens (hence routing) after it, and
    different seq_ids. Aligning by seq_id and position would report disagreements that are only
    different contexts; aligning by token ids compares the prefix alone, and it agrees."""
    from moescope.store.tables import write_trace

    k, e = 2, 8
    rng = np.random.default_rng(7)
    shared = [3, 1, 4, 1, 5, 9]

    def trace(path, seq_id, ids, experts):
        n = len(ids)
        model = {"n_experts": e, "top_k": k, "moe_layers": [0, 1], "n_layers": 2}
        routes = {"seq_id": np.full(2 * n, seq_id, np.uint32), "pos": np.repeat(np.arange(n), 2).astype(np.uint32),
                  "layer": np.tile([0, 1], n).astype(np.uint16), "experts": [list(map(int, x)) for x in experts]}
        tokens = {"seq_id": np.full(n, seq_id, np.uint32), "pos": np.arange(n, dtype=np.uint32),
                  "token_id": np.asarray(ids, np.uint32), "phase": ["prompt"] * 4 + ["generated"] * (n - 4)}
        write_trace(path, routes=routes, tokens=tokens, model=model, capture={"expert_ids": "logical"})
        return moescope.open_trace(path)

    ex_a = [rng.choice(e, k, replace=False) for _ in range(2 * 10)]
    ex_b = ex_a[: 2 * 6] + [(x + 1) % e for x in ex_a[2 * 6: 2 * 9]]  # diverged: other tokens, other routes
    a = trace(tmp_path / "a", 0, shared + [2, 6, 5, 3], ex_a)
    b = trace(tmp_path / "b", 7, shared + [7, 7, 7], ex_b)
    v = agreement(a, b, figures=False).values
    assert v["alignment"]["n_pairs_prefix_only"] == 1
    assert v["n_tokens_compared"] == 6 and v["n_tokens_unaligned"] == (10 - 6) + (9 - 6)
    assert v["per_layer_n"] == [6, 6] and v["per_layer_set_agreement"] == [1.0, 1.0]
    assert v["per_layer_rows_only_a"] == [0, 0]  # rows past the divergence are unaligned, not "only in A"


def test_dense_layer_model_round_trip_keeps_decoder_layer_numbers(tmp_path):
    """Qwen2-MoE with decoder layer 1 dense (mlp_only_layers): transformers routing -> the engine's
    [tokens, num_hidden_layers, k] buffer (zeros at the dense layer) -> import -> agreement 1.0 at
    decoder layers 0, 2, 3."""
    import torch

    from moescope.capture.recorder import record
    from moescope.store.tables import write_trace
    from moescope.testing.tiny import tiny_model

    model = tiny_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[1])
    model.config.save_pretrained(tmp_path / "cfg")
    served = describe_engine_model(str(tmp_path / "cfg"), with_tokenizer=False)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with record(model) as rec, torch.inference_mode():
        model(input_ids=ids)
    tables = rec.tables()
    write_trace(tmp_path / "hf", routes=tables["routes"], tokens=tables["tokens"], sequences=tables["sequences"],
                model={"n_experts": served.n_experts, "top_k": served.top_k, "moe_layers": [0, 2, 3]},
                capture={"expert_ids": "logical"})
    hf = moescope.open_trace(tmp_path / "hf")
    assert hf.moe_layers == [0, 2, 3]
    lines = []
    for i, s in enumerate(trace_sequences(hf)):
        prompt, output = s["prompt"][:6], s["prompt"][6:]  # call the last 3 tokens a completion
        lines.append(vllm_line(f"r{i}", prompt, [(output, engine_array(s["routing"], 4, [0, 2, 3]))]))
    src = _write(tmp_path / "r.jsonl", lines)
    import_requests(VllmSource([src], served), tmp_path / "imp", model=served)
    v = agreement(hf, moescope.open_trace(tmp_path / "imp"), figures=False).values
    assert v["moe_layers"] == [0, 2, 3] and v["per_layer_set_agreement"] == [1.0, 1.0, 1.0]
    assert v["per_layer_rows_only_a"] == [2, 2, 2]  # each sequence's last token: never fed to an engine


def test_replay_resumes_and_refuses_other_weights(round_trip, tiny_dir):
    import torch

    from moescope.capture.loading import load_model
    from moescope.capture.recorder import CaptureOptions
    from moescope.capture.replay import replay_trace

    model, tok = load_model(str(tiny_dir))
    again = replay_trace(model, tok, round_trip / "vllm", round_trip / "replay", options=CaptureOptions(router_scores="logits"))
    assert again["complete"]  # the same replay: nothing to do
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("gate.weight")).add_(1.0)
    with pytest.raises(MoescopeError):
        replay_trace(model, tok, round_trip / "vllm", round_trip / "replay", options=CaptureOptions(router_scores="logits"))
