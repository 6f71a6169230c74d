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
    assert not result.ok and "bytes, the manifest says" in result.problems[0]  # size first: no hashing needed
    raw = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(raw) + b"0123456789")  # the recorded size again, other bytes: the checksum says so
    assert "checksum differs" in validate(moescope.open_trace(tmp_path / "t", verify=False)).problems[0]
    r = subprocess.run(MOESCOPE + ["inspect", str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode != 0 and "failed validation" in r.stderr


def committed_sequences(out: Path) -> int:
    """Sequences in the shards the manifest lists (-1 before the manifest exists)."""
    try:
        return sum(s["n_sequences"] for s in json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1


def kill_at_random_moments(cmd: list[str], out: Path, total: int, trials: int, seed: int) -> list[int]:
    """Run `cmd` (a capture into `out` of `total` records) `trials` times, each resuming the last,
    and SIGKILL each run at a random moment; returns the committed sequences at each kill.

    The moments are spread over the whole run: kill i waits until the committed sequences reach
    a target drawn uniformly over the run (sorted, so each run has work left), then sleeps a
    random part of a batch so the kill lands anywhere in writing a shard, renaming it or
    replacing the manifest. Each kill must land before the run completes."""
    import random

    rng = random.Random(seed)
    targets = sorted(rng.uniform(0.0, 0.85) * total for _ in range(trials))
    at_kill = []
    for target in targets:
        proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and committed_sequences(out) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.03))  # within the next batch or shard write, even on a fast machine
        assert proc.poll() is None, f"the run ended before its kill (target {target:.0f} of {total} sequences)"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill.append(committed_sequences(out))
        assert not json.loads((out / "manifest.json").read_text())["complete"]
    return at_kill


def check_kills_then_resume(tiny_dir: Path, tmp_path: Path, n: int, trials: int, seed: int) -> list[int]:
    data = write_jsonl(tmp_path / "d.jsonl", n)
    cmd = MOESCOPE + ["capture", "--model", str(tiny_dir), "--data", str(data), "--batch-size", "4",
                      "--shard-rows", "200"]
    clean = subprocess.run(cmd + ["--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    at_kill = kill_at_random_moments(cmd, out, n, trials, seed)
    resumed = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _tables(tmp_path / "clean"), _tables(out)
    for name in a:
        assert a[name].equals(b[name]), name
    assert b["sequences"].column("seq_id").to_pylist() == list(range(n))  # every sequence exactly once
    assert validate(moescope.open_trace(out)).ok
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    return at_kill


def test_kill_9_at_random_moments_then_resume_gives_every_sequence_once(tiny_dir, tmp_path):
    at_kill = check_kills_then_resume(tiny_dir, tmp_path, n=160, trials=3, seed=1)
    assert at_kill == sorted(at_kill) and at_kill[-1] > 0


@pytest.mark.slow
def test_kill_9_at_many_random_moments(tiny_dir, tmp_path):
    at_kill = check_kills_then_resume(tiny_dir, tmp_path, n=600, trials=8, seed=2)
    assert sum(k > 40 for k in at_kill) >= 4  # most kills after several shards


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
