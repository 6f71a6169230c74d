"""Importers: vLLM routed experts and SGLang expert-distribution dumps, in their documented formats."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moescope
from moescope.errors import DataError, TraceError
from moescope.importers.common import import_requests, parse_layers
from moescope.importers.sglang import SglangSource
from moescope.importers.vllm import VllmSource
from moescope.store.validate import validate

MOESCOPE = [sys.executable, "-m", "moescope.cli"]
E, L, K = 16, 4, 2


def fake_requests(n: int, seed: int = 0) -> list[dict]:
    """vLLM-shaped outputs: prompt/output token ids and int16 routing, the prompt's first rows
    served from the prefix cache (-1) in every third request, one row fewer than tokens
    (the last generated token is never fed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, g = int(rng.integers(3, 9)), int(rng.integers(1, 6))
        routing = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(p + g - 1)])
        routing = routing.astype(np.int16)
        if i % 3 == 0:
            routing[:2] = -1
        out.append({"request_id": f"req-{i}", "prompt": f"prompt {i}", "label": ["math", "code"][i % 2],
                    "prompt_token_ids": rng.integers(0, 100, p).tolist(), "output_token_ids": rng.integers(0, 100, g).tolist(),
                    "routing": routing, "n_prompt": p})
    return out


def write_split_jsonl(path: Path, reqs: list[dict]) -> Path:
    """vLLM >= 0.21 form: prompt_routed_experts + routed_experts, as nested lists."""
    with open(path, "w", encoding="utf-8") as f:
        for r in reqs:
            p = r["n_prompt"]
            obj = {k: v for k, v in r.items() if k not in ("routing", "n_prompt")}
            obj["prompt_routed_experts"] = r["routing"][:p].tolist()
            obj["routed_experts"] = r["routing"][p:].tolist()
            f.write(json.dumps(obj) + "\n")
    return path


def routes_by_key(trace) -> dict:
    rows = trace.rows("SELECT seq_id, pos, layer, experts FROM routes")
    return {(s, p, layer): list(e) for s, p, layer, e in rows}


def test_vllm_jsonl_split_form(tmp_path):
    reqs = fake_requests(12)
    src = write_split_jsonl(tmp_path / "routed.jsonl", reqs)
    manifest = import_requests(VllmSource([src]), tmp_path / "t", layers=parse_layers("3-6"), model_name="toy-moe",
                               n_experts=E)
    assert manifest["capture"]["mode"] == "import" and manifest["capture"]["has_weights"] is False
    assert manifest["model"]["moe_layers"] == [3, 4, 5, 6] and manifest["model"]["top_k"] == K
    trace = moescope.open_trace(tmp_path / "t")
    assert validate(trace).ok and not trace.has_weights
    assert trace.scalar("SELECT count(*) FROM routes WHERE weights IS NOT NULL") == 0
    got = routes_by_key(trace)
    want = {}
    for s, r in enumerate(reqs):
        for pos, row in enumerate(r["routing"]):
            if (row >= 0).any():
                for li, layer in enumerate([3, 4, 5, 6]):
                    want[(s, pos, layer)] = row[li].tolist()
    assert got == want  # every routed token at every layer, prefix-cache rows left out
    tok = trace.rows("SELECT seq_id, count(*) FILTER (phase = 'prompt'), count(*) FILTER (phase = 'generated') "
                     "FROM tokens GROUP BY seq_id ORDER BY seq_id")
    assert [(p, g) for _, p, g in tok] == [(r["n_prompt"], len(r["output_token_ids"])) for r in reqs]
    seqs = trace.rows("SELECT seq_id, text, label, request_id FROM sequences ORDER BY seq_id")
    assert seqs[5] == (5, "prompt 5", "code", "req-5")


def test_vllm_npz_npy_directory_via_cli(tmp_path):
    reqs = fake_requests(4, seed=1)
    d = tmp_path / "dump"
    d.mkdir()
    for i, r in enumerate(reqs[:3]):  # one array over prompt + generated tokens, the older single-array form
        np.savez(d / f"req-{i:03d}.npz", routed_experts=r["routing"], prompt_token_ids=np.array(r["prompt_token_ids"]),
                 output_token_ids=np.array(r["output_token_ids"]), prompt=np.array(r["prompt"]))
    np.save(d / "req-003.npy", reqs[3]["routing"])
    # .npy carries no token ids: mixing it with requests that have them is refused
    r = subprocess.run(MOESCOPE + ["import", "vllm", str(d), "--out", str(tmp_path / "bad"), "--n-experts", "16"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "token ids for all or none" in r.stderr and "Traceback" not in r.stderr
    (d / "req-003.npy").unlink()
    r = subprocess.run(MOESCOPE + ["import", "vllm", str(d), "--out", str(tmp_path / "t"), "--n-experts", "16",
                                   "--model-name", "toy"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    trace = moescope.open_trace(tmp_path / "t")
    assert trace.rows("SELECT text FROM sequences ORDER BY seq_id") == [("prompt 0",), ("prompt 1",), ("prompt 2",)]
    assert validate(trace).ok


def test_vllm_npy_only_has_no_tokens_table(tmp_path):
    reqs = fake_requests(3, seed=2)
    for i, r in enumerate(reqs):
        np.save(tmp_path / f"r{i}.npy", r["routing"])
    with pytest.warns(UserWarning, match="--n-experts not given"):
        import_requests(VllmSource(sorted(tmp_path.glob("*.npy"))), tmp_path / "t")
    trace = moescope.open_trace(tmp_path / "t")
    assert not trace.has("tokens") and trace.n_experts == max(int(r["routing"].max()) for r in reqs) + 1


def test_vllm_bad_inputs_are_refused_in_one_line(tmp_path):
    bad = tmp_path / "obj.npz"
    np.savez(bad, routed_experts=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="np.savez"):
        import_requests(VllmSource([bad]), tmp_path / "t1")
    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"prompt_token_ids": [1, 2]}) + "\n")
    with pytest.raises(DataError, match="enable-return-routed-experts"):
        import_requests(VllmSource([missing]), tmp_path / "t2")
    short = tmp_path / "s.jsonl"
    short.write_text(json.dumps({"prompt_token_ids": [1], "output_token_ids": [],
                                 "routed_experts": [[[0, 1]], [[1, 2]], [[2, 3]]]}) + "\n")
    with pytest.raises(DataError, match="only 1 tokens"):
        import_requests(VllmSource([short]), tmp_path / "t3")
    src = write_split_jsonl(tmp_path / "ok.jsonl", fake_requests(3))
    with pytest.raises(DataError, match="--n-experts is 4"):
        import_requests(VllmSource([src]), tmp_path / "t4", n_experts=4)


def test_analyses_run_without_weights_and_weighted_ones_refuse(tmp_path):
    from moescope.analysis.signatures import routing_signatures
    from moescope.analysis.stats import routing_statistics

    src = write_split_jsonl(tmp_path / "routed.jsonl", fake_requests(40, seed=3))
    import_requests(VllmSource([src]), tmp_path / "t", n_experts=E)
    trace = moescope.open_trace(tmp_path / "t")
    stats = routing_statistics(trace, label="label", permutations=5, figures=False)
    assert stats.values["weights"] is None
    assert any("no routing weights" in note for note in stats.values["notes"])
    assert stats.values["phases"] is not None  # prompt vs generated from vLLM's split
    sig = routing_signatures(trace, label="label", permutations=3, control_draws=1, figures=False)
    assert sig.values["n_sequences"] == 40
    with pytest.raises(TraceError, match=r"weight-scaled load needs routing weights, but .* \(vllm\) recorded expert ids only"):
        trace.require_weights("weight-scaled load")


# -- SGLang ----------------------------------------------------------------------------------------
class NotAllowed:  # a class only a full unpickler could rebuild
    pass


def sglang_dump(seed: int = 0) -> dict:
    """A per_token dump: 4 decoder layers (layer 0 dense: all -1), 8 id columns of which k=2
    are used, 10 physical experts mapping to 8 logical ones (EPLB replicas 8 -> 3, 9 -> 5)."""
    rng = np.random.default_rng(seed)
    mapping = torch.tensor([list(range(8)) + [3, 5]] * 4)

    def record(pass_id: int, lens: list[int] | None, n: int) -> dict:
        topk = torch.full((4, n, 8), -1, dtype=torch.int32)
        for layer in (1, 2, 3):
            for t in range(n):
                topk[layer, t, :2] = torch.tensor(rng.choice(10, 2, replace=False))
        positions = [p for ln in lens for p in range(ln)] if lens else rng.integers(5, 40, n).tolist()
        return {"forward_pass_id": pass_id, "rank": 0, "gatherer_key": "primary", "input_ids": rng.integers(0, 50, n).tolist(),
                "positions": positions, "extend_seq_lens": lens, "forward_mode": 1 if lens else 2,
                "topk_ids_of_layer": topk, "misc_objects": [], "global_physical_count": torch.zeros(4, 10, dtype=torch.int32)}

    records = [record(0, [5, 3], 8), record(1, None, 2), record(2, [4], 4), record(3, None, 3)]
    return {"records": records, "last_physical_to_logical_map": mapping}


def test_sglang_per_token_dump(tmp_path):
    dump = sglang_dump()
    torch.save(dump, tmp_path / "expert_distribution_recorder_1.0_0.pt")
    torch.save(dump, tmp_path / "expert_distribution_recorder_1.0_1.pt")  # a TP rank saw the same passes
    manifest = import_requests(SglangSource([tmp_path]), tmp_path / "t", used_slots_only=True, n_experts=8,
                               model_name="toy-sglang")
    assert manifest["model"]["moe_layers"] == [1, 2, 3] and manifest["model"]["top_k"] == 2
    trace = moescope.open_trace(tmp_path / "t")
    assert validate(trace).ok
    # segments: 2 + 1 prefill sequences, 2 + 3 one-token decode sequences; duplicates read once
    assert trace.scalar("SELECT count(*) FROM sequences") == 8
    assert trace.rows("SELECT phase, count(*) FROM tokens GROUP BY phase ORDER BY phase") == [("generated", 5), ("prompt", 12)]
    mapping = dump["last_physical_to_logical_map"].numpy()
    rec = dump["records"][0]
    first = trace.rows("SELECT pos, layer, experts FROM routes WHERE seq_id = 1 ORDER BY pos, layer")
    phys = rec["topk_ids_of_layer"].numpy()
    want = [(p, layer, [int(mapping[layer, x]) for x in phys[layer, 5 + p, :2]]) for p in range(3) for layer in (1, 2, 3)]
    assert [(p, layer, list(e)) for p, layer, e in first] == want  # physical ids mapped to logical ones
    decode = trace.rows("SELECT t.pos, s.forward_pass_id FROM tokens t JOIN sequences s USING (seq_id) "
                        "WHERE t.phase = 'generated' ORDER BY seq_id")
    assert decode[0] == (dump["records"][1]["positions"][0], 1)  # SGLang's own position is kept


def test_sglang_refuses_stat_dumps_and_pickled_objects(tmp_path):
    torch.save({"rank": 0, "logical_count": torch.zeros(3, 4, 8)}, tmp_path / "stat.pt")
    with pytest.raises(DataError, match="'stat' dump"):
        import_requests(SglangSource([tmp_path / "stat.pt"]), tmp_path / "t1")
    torch.save({"records": [], "extra": NotAllowed()}, tmp_path / "pickled.pt")
    with pytest.raises(DataError, match="weights_only"):
        import_requests(SglangSource([tmp_path / "pickled.pt"]), tmp_path / "t2")
    r = subprocess.run(MOESCOPE + ["import", "sglang", str(tmp_path / "stat.pt"), "--out", str(tmp_path / "t3")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "per_token" in r.stderr and "Traceback" not in r.stderr


# -- docs/scale.md: the query snippets run as written -----------------------------------------------
def _doc_snippets(marker: str) -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "scale.md").read_text(encoding="utf-8")
    blocks = text.split("```python\n")[1:]
    return [b.split("```")[0] for b in blocks if marker in b.split("```")[0]]


@pytest.mark.parametrize("marker", ["import duckdb", "import pandas"])
def test_docs_query_snippets_run(tmp_path, monkeypatch, marker):
    src = write_split_jsonl(tmp_path / "routed.jsonl", fake_requests(6))
    (tmp_path / "runs").mkdir()
    import_requests(VllmSource([src]), tmp_path / "runs" / "olmoe", n_experts=E)
    monkeypatch.chdir(tmp_path)
    (code,) = _doc_snippets(marker)
    scope: dict = {}
    exec(compile(code, f"docs/scale.md ({marker})", "exec"), scope)
    if marker == "import duckdb":
        assert int(scope["load"]["n"].sum()) == moescope.open_trace("runs/olmoe").scalar("SELECT count(*) FROM routes") * K
        assert set(scope["per_label"]["label"]) == {"math", "code"}
    else:
        assert len(scope["routes"]) == moescope.open_trace("runs/olmoe").scalar("SELECT count(*) FROM routes")
