"""The trace store: streaming shards, atomic commits, resume after kill -9, validation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import moescope
from moescope.capture.dataset import RunOptions, capture_dataset
from moescope.errors import TraceError
from moescope.store.validate import validate

MOESCOPE = [sys.executable, "-m", "moescope.cli"]


def write_jsonl(path: Path, n: int) -> Path:
    words = "alpha beta gamma delta fox river code print sum story moon".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 17))
            f.write(json.dumps({"text": text, "label": ["code", "story"][i % 2], "idx": i}) + "\n")
    return path


def _tables(trace_dir: Path):
    trace = moescope.open_trace(trace_dir)
    out = {}
    for name, keys in (("sequences", ["seq_id"]), ("tokens", ["seq_id", "pos"]), ("routes", ["seq_id", "pos", "layer"])):
        out[name] = trace.table(name).sort_by([(k, "ascending") for k in keys])
    return out


def test_capture_dataset_writes_a_valid_trace(tiny, tmp_path):
    model, tok = tiny
    data = write_jsonl(tmp_path / "d.jsonl", 40)
    manifest = capture_dataset(model, tok, data, tmp_path / "t", run=RunOptions(batch_size=4, shard_rows=500))
    assert manifest["complete"] and len(manifest["shards"]) > 2
    trace = moescope.open_trace(tmp_path / "t")
    assert validate(trace).ok
    assert trace.scalar("SELECT count(*) FROM sequences") == 40
    assert trace.rows("SELECT DISTINCT label FROM sequences ORDER BY label") == [("code",), ("story",)]
    # routes: one row per real token per MoE layer; tokens carry char offsets into the text
    n_tok = trace.scalar("SELECT count(*) FROM tokens")
    assert trace.scalar("SELECT count(*) FROM routes") == n_tok * len(trace.moe_layers)
    row = trace.rows("SELECT s.text, t.char_start, t.char_end, t.token FROM tokens t JOIN sequences s USING (seq_id) "
                     "WHERE t.pos = 1 AND s.seq_id = 3")[0]
    assert row[0][row[1]:row[2]] == row[3].strip() or row[0][row[1]:row[2]] == row[3]
    # the dtypes of the information bound
    schema = pq.read_schema(trace.files("routes")[0])
    assert str(schema.field("experts").type) == "list<element: uint8>"
    assert str(schema.field("weights").type) == "list<element: halffloat>"
    # Arrow access streams in batches
    assert sum(b.num_rows for b in trace.batches("routes", ["layer"], batch_size=100)) == n_tok * 3


def test_same_input_gives_same_bytes(tiny, tmp_path):
    model, tok = tiny
    data = write_jsonl(tmp_path / "d.jsonl", 12)
    for name in ("a", "b"):
        capture_dataset(model, tok, data, tmp_path / name, run=RunOptions(batch_size=4))
    for sub in ("sequences", "tokens", "routes"):
        a = sorted((tmp_path / "a" / sub).iterdir())
        b = sorted((tmp_path / "b" / sub).iterdir())
        assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert (tmp_path / "a/manifest.json").read_text() == (tmp_path / "b/manifest.json").read_text()


def test_refuses_a_directory_holding_a_different_trace(tiny, tmp_path):
    model, tok = tiny
    a = write_jsonl(tmp_path / "a.jsonl", 5)
    b = write_jsonl(tmp_path / "b.jsonl", 6)
    capture_dataset(model, tok, a, tmp_path / "t")
    with pytest.raises(TraceError, match="different trace"):
        capture_dataset(model, tok, b, tmp_path / "t")
    capture_dataset(model, tok, b, tmp_path / "t", overwrite=True)
    assert moescope.open_trace(tmp_path / "t").scalar("SELECT count(*) FROM sequences") == 6


def test_unfinished_trace_is_not_mistaken_for_complete(tiny, tmp_path):
    model, tok = tiny
    data = write_jsonl(tmp_path / "d.jsonl", 20)
    capture_dataset(model, tok, data, tmp_path / "t", run=RunOptions(batch_size=4, shard_rows=100))
    manifest = json.loads((tmp_path / "t/manifest.json").read_text())
    manifest["complete"] = False
    (tmp_path / "t/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match="unfinished"):
        moescope.open_trace(tmp_path / "t")


def test_validation_catches_a_damaged_shard(tiny, tmp_path):
    model, tok = tiny
    data = write_jsonl(tmp_path / "d.jsonl", 10)
    capture_dataset(model, tok, data, tmp_path / "t")
    shard = next((tmp_path / "t/routes").iterdir())
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(TraceError, match="damaged"):  # analyses never read it
        moescope.open_trace(tmp_path / "t")
    result = validate(moescope.open_trace(tmp_path / "t", verify=False))
    assert not result.ok and "checksum" in result.problems[0]
    r = subprocess.run(MOESCOPE + ["inspect", str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode != 0 and "failed validation" in r.stderr


def test_kill_9_at_any_moment_then_resume_gives_every_sequence_once(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", 600)
    cmd = MOESCOPE + ["capture", "--model", str(tiny_dir), "--data", str(data), "--batch-size", "4",
                      "--shard-rows", "400"]
    clean = subprocess.run(cmd + ["--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    kills = 0
    for wait_shards in (0, 2, 5, 9):  # kill before any shard, then at later points
        proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                shards = len(json.loads((out / "manifest.json").read_text())["shards"])
            except (OSError, ValueError, KeyError):
                shards = -1
            if shards >= wait_shards and (wait_shards > 0 or (out / "manifest.json").exists()):
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the capture finished before it could be killed; make the data bigger"
    resumed = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _tables(tmp_path / "clean"), _tables(out)
    for name in a:
        assert a[name].equals(b[name]), name
    assert validate(moescope.open_trace(out)).ok
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_writer_commits_files_written_elsewhere_and_tracks_done_ranges(tmp_path):
    import pyarrow as pa

    from moescope.store.writer import TraceWriter, write_shard_file

    def part(lo: int, hi: int) -> dict:
        ids = pa.array(range(lo, hi), pa.uint32())
        seq = pa.table({"seq_id": ids, "text": pa.array([str(i) for i in range(lo, hi)])})
        routes = pa.table({"seq_id": ids, "pos": pa.array([0] * (hi - lo), pa.uint32()),
                           "layer": pa.array([0] * (hi - lo), pa.uint16()),
                           "experts": pa.array([[1]] * (hi - lo), pa.list_(pa.uint8()))})
        return {name: write_shard_file(tmp_path / "t", name, f"part-r{lo:012d}", t)
                for name, t in (("sequences", seq), ("routes", routes))}

    header = {"model": {"n_experts": 4, "top_k": 1, "moe_layers": [0]}}
    writer = TraceWriter(tmp_path / "t", header, "fp")
    writer.commit(part(8, 12), 8, 12, 4)  # out of order, as workers finish
    writer.commit(part(0, 4), 0, 4, 4)
    assert writer.done_ranges == [(0, 4), (8, 12)] and writer.input_done == 4
    assert writer.pending(14) == [(4, 8), (12, 14)]
    with pytest.raises(TraceError, match="overlap"):
        writer.commit(part(2, 6), 2, 6, 4)
    leftover = part(4, 8)  # written, never committed (the driver died)
    with pytest.raises(TraceError, match=f"pid {os.getpid()}"):  # the first writer still holds the lock
        TraceWriter(tmp_path / "t", header, "fp")
    writer.close()  # as the OS does when the driver dies
    reopened = TraceWriter(tmp_path / "t", header, "fp")
    assert not (tmp_path / "t" / leftover["routes"]["path"]).exists()
    assert reopened.pending(12) == [(4, 8)]
    reopened.add({"sequences": pa.table({"seq_id": pa.array(range(4, 8), pa.uint32()), "text": pa.array(list("abcd"))}),
                  "routes": pa.table({"seq_id": pa.array(range(4, 8), pa.uint32()), "pos": pa.array([0] * 4, pa.uint32()),
                                      "layer": pa.array([0] * 4, pa.uint16()),
                                      "experts": pa.array([[2]] * 4, pa.list_(pa.uint8()))})},
                 input_end=8, n_sequences=4, input_start=4)
    manifest = reopened.finish()
    assert [s["input_start"] for s in manifest["shards"]] == [0, 4, 8]  # listed in input order
    assert moescope.open_trace(tmp_path / "t").scalar("SELECT count(DISTINCT seq_id) FROM sequences") == 12
