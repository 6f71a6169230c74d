"""The Python API: one keyword style, record -> trace, analyses from moescope.analysis,
layer selection, sequence selection (--where), sub-traces (moescope filter), trace.sql()."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import moescope
from moescope.errors import MoescopeError

ROOT = Path(__file__).resolve().parent.parent


class Done:
    """What a `moescope` command run in this process did."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stderr = returncode, stderr


def cli(*args, capsys) -> Done:
    """Run `moescope ARGS` in this process (a subprocess would pay the imports again)."""
    from moescope.cli import main

    old, sys.argv = sys.argv, ["moescope", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    return Done(code, capsys.readouterr().err)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"text": f"The quick brown fox {i} jumps over the lazy dog.", "label": "a" if i % 2 else "b"}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    from moescope.testing.synthetic import labelled_trace

    return labelled_trace(tmp_path_factory.mktemp("syn") / "trace", n_seq=24, seq_len=12, layers=3, n_experts=8,
                          labels=("a", "b"), biased_layers=(1,))


def test_capture_dataset_takes_keywords_like_record(tiny, prompts, tmp_path):
    model, tok = tiny
    manifest = moescope.capture_dataset(model, tok, prompts, tmp_path / "kw", batch_size=4, router_scores="probs",
                                        layers=[0, 2], seed=3)
    cap = manifest["capture"]
    assert cap["batch_size"] == 4 and cap["option_router_scores"] == "probs" and cap["layers"] == [0, 2]
    assert cap["seed"] == cap["option_seed"] == 3  # one seed for sampling and the hidden sampler
    trace = moescope.open_trace(tmp_path / "kw")
    assert trace.moe_layers == [0, 2]
    assert sorted(r[0] for r in trace.rows("SELECT DISTINCT layer FROM routes")) == [0, 2]
    # the trap: layer 1 was not captured, so it must not show up as a layer whose experts all died
    from moescope.analysis import routing_statistics

    stats = routing_statistics(trace, permutations=0, figures=False)
    assert stats.values["moe_layers"] == [0, 2] and list(stats.df().index) == [0, 2]
    # the option objects are still accepted, and keywords override their fields
    from moescope.capture.dataset import RunOptions

    m2 = moescope.capture_dataset(model, tok, prompts, tmp_path / "obj", run=RunOptions(batch_size=2), batch_size=3)
    assert m2["capture"]["batch_size"] == 3 and m2["capture"]["layers"] == trace.model["moe_layers"]
    with pytest.raises(TypeError, match="batchsize.*accepted: .*batch_size"):
        moescope.capture_dataset(model, tok, prompts, tmp_path / "bad", batchsize=4)


def test_layers_outside_the_moe_layers_are_refused_in_one_line(tiny, prompts, tmp_path, capsys):
    model, tok = tiny
    with pytest.raises(MoescopeError, match=r"layer\(s\) 7 are not MoE layers.*MoE layers are 0, 1, 2$"):
        moescope.record(model, tokenizer=tok, layers=[0, 7])
    with pytest.raises(MoescopeError, match="MoE layers are 0, 1, 2"):
        moescope.capture_dataset(model, tok, prompts, tmp_path / "x", layers=[5])
    assert not (tmp_path / "x").exists()  # refused before anything is written
    res = cli("capture", "--model", tiny_model_dir(model), "--data", prompts, "--out", tmp_path / "c", "--layers", "9", capsys=capsys)
    assert res.returncode != 0 and "its MoE layers are 0, 1, 2" in res.stderr


def tiny_model_dir(model) -> str:
    return model.config._name_or_path


def test_record_tables_are_idempotent_and_save_writes_a_trace(tiny, tmp_path):
    model, tok = tiny
    batch = tok(["The quick brown fox", "A stitch in time saves nine"], return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and tok.pad_token is not None  # load_model: ready for batched generate
    with moescope.record(model, tokenizer=tok, layers=(1,), hidden_rate=1.0) as rec:
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    first = rec.tables()
    again = rec.tables()  # a rerun notebook cell
    assert set(first) == {"sequences", "tokens", "routes", "hidden"}
    for name in first:
        assert first[name].equals(again[name])
    assert set(first["routes"].column("layer").to_pylist()) == {1}
    # char spans index into the recorded text, as capture's do
    tokens = first["tokens"].to_pylist()
    texts = dict(zip(first["sequences"].column("seq_id").to_pylist(), first["sequences"].column("text").to_pylist()))
    prompt = [t for t in tokens if t["phase"] == "prompt"]
    assert all(t["char_start"] >= 0 for t in prompt)
    for t in prompt:
        assert texts[t["seq_id"]][t["char_start"]:t["char_end"]] == t["token"]
    assert texts[0] == "The quick brown fox"
    trace = rec.save(tmp_path / "rec")
    assert trace.moe_layers == [1] and trace.manifest["capture"]["mode"] == "record"
    assert trace.manifest["tokenizer"]["padding_side"] == "left"
    assert trace.scalar("SELECT count(*) FROM routes") == first["routes"].num_rows
    assert trace.has("hidden")
    from moescope.store.validate import validate

    assert validate(trace).ok, validate(trace)


def test_trace_sql_arrow_is_a_table_and_leaves_the_trace_usable(labelled):
    trace = moescope.open_trace(labelled)
    table = trace.sql("SELECT layer, count(*) AS n FROM routes GROUP BY layer ORDER BY layer").arrow()
    assert isinstance(table, pa.Table) and table.num_rows == 3
    assert trace.scalar("SELECT count(*) FROM sequences") == 24  # would block on a lazy reader
    assert len(trace.sql("SELECT * FROM sequences").df()) == 24


def test_where_selects_sequences_in_every_table(labelled):
    trace = moescope.open_trace(labelled, where="label = 'a'")
    seqs = trace.table("sequences")
    assert set(seqs.column("label").to_pylist()) == {"a"} and seqs.num_rows == 12
    kept = set(seqs.column("seq_id").to_pylist())
    assert set(trace.table("routes", columns=["seq_id"]).column("seq_id").to_pylist()) == kept
    assert {r[0] for r in trace.rows("SELECT DISTINCT seq_id FROM tokens")} == kept
    assert sum(b.num_rows for b in trace.batches("routes")) == trace.scalar("SELECT count(*) FROM routes")


def test_bad_predicates_fail_in_one_clear_line(labelled):
    with pytest.raises(MoescopeError, match="does not run on the sequences table.*its columns are seq_id, text"):
        moescope.open_trace(labelled, where="colour = 'red'")
    with pytest.raises(MoescopeError, match="not a valid SQL predicate"):
        moescope.open_trace(labelled, where="label = = 'a'")
    with pytest.raises(MoescopeError, match="one SQL predicate"):
        moescope.open_trace(labelled, where="true); DROP VIEW routes; SELECT (1")
    with pytest.raises(MoescopeError, match="selects no sequence"):
        moescope.open_trace(labelled, where="label = 'zzz'")


def test_analyses_from_one_place_with_pandas_and_html_views(labelled):
    from moescope.analysis import routing_signatures, routing_statistics

    trace = moescope.open_trace(labelled, where="seq_id < 20")
    stats = routing_statistics(trace, permutations=0, figures=False)
    frame = stats.df()
    assert list(frame.index) == [0, 1, 2] and "load.entropy_bits" in frame.columns
    assert stats.where == "seq_id < 20"
    stats.values["notes"] = ["<script>alert(1)</script>"]
    stats.values["label"] = "<b>x</b>"
    html = stats._repr_html_()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<script>" not in html
    sig = routing_signatures(trace, label="label", folds=2, permutations=2, control_draws=1, figures=False)
    assert sig.to_pandas().shape[0] >= 1 and sig.df("per_layer_accuracy").index.name == "layer"


def test_where_on_analyze_commands_is_applied_and_recorded(labelled, tmp_path, capsys):
    res = cli("analyze", "stats", labelled, "--out", tmp_path / "s", "--permutations", "0", "--where", "label = 'b'", capsys=capsys)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "s" / "results.json").read_text())
    assert out["where"] == "label = 'b'"
    assert out["n_tokens"] == [12 * 12] * 3  # 12 sequences of 12 tokens kept, at each of 3 layers
    res = cli("analyze", "stats", labelled, "--out", tmp_path / "t", "--where", "colour = 1", capsys=capsys)
    assert res.returncode != 0 and "its columns are" in res.stderr and "Traceback" not in res.stderr


def test_filter_writes_a_sub_trace_with_provenance(labelled, tmp_path, capsys):
    res = cli("filter", labelled, "--where", "label = 'a' AND seq_id < 10", "--out", tmp_path / "sub", capsys=capsys)
    assert res.returncode == 0, res.stderr
    sub = moescope.open_trace(tmp_path / "sub")
    src = moescope.open_trace(labelled, where="label = 'a' AND seq_id < 10")
    assert sub.model == src.model and sub.moe_layers == src.moe_layers
    prov = sub.manifest["provenance"]["filtered_from"]
    assert prov["where"] == "label = 'a' AND seq_id < 10" and prov["source"] == str(Path(labelled).resolve())
    for table in ("sequences", "tokens", "routes"):
        assert sub.sql(f"SELECT * FROM {table} ORDER BY ALL").fetchall() == \
            src.sql(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
    assert sub.manifest["totals"]["n_sequences"] == len(src.selected_seq_ids)
    from moescope.store.validate import validate

    assert validate(sub).ok, validate(sub)
