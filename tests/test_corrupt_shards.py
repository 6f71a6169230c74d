"""A damaged shard is never read silently: every analysis refuses it in one line naming it."""
from __future__ import annotations

import json
import shutil

import pytest

import moescope
from moescope.capture.dataset import RunOptions, capture_dataset
from moescope.capture.recorder import CaptureOptions
from moescope.errors import TraceError

from test_cli_errors import assert_one_line_error, run_cli
from test_store import write_jsonl

TABLE_KINDS = ("sequences", "tokens", "routes", "hidden")


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    """A small trace with every table (hidden states and router probabilities included)."""
    model, tok = tiny
    root = tmp_path_factory.mktemp("corrupt")
    data = write_jsonl(root / "d.jsonl", 16)
    capture_dataset(model, tok, data, root / "clean", run=RunOptions(batch_size=8),
                    options=CaptureOptions(hidden_rate=0.5, router_scores="probs"))
    return root / "clean"


def damaged(clean, tmp_path, table: str):
    """A copy of the trace with 7 bytes overwritten inside the first shard of `table` (same size)."""
    out = tmp_path / f"bad-{table}"
    shutil.copytree(clean, out)
    shard = out / json.loads((out / "manifest.json").read_text())["shards"][0]["files"][table]["path"]
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 7] = bytes(b ^ 0xFF for b in data[middle:middle + 7])
    shard.write_bytes(bytes(data))
    return out, shard.relative_to(out).as_posix()


def analyze_commands(trace, clean, out):
    """Every `moescope analyze` command that reads an existing trace, pointed at `trace`."""
    return {
        "stats": ["analyze", "stats", str(trace), "--out", str(out / "stats")],
        "signatures": ["analyze", "signatures", str(trace), "--label", "label", "--out", str(out / "sig")],
        "geometry": ["analyze", "geometry", str(trace), "--out", str(out / "geo")],
        "compare": ["analyze", "compare", str(clean), str(trace), "--out", str(out / "cmp")],
        "pos": ["analyze", "pos", "--trace", str(trace), "--out", str(out / "pos")],
        "semantic": ["analyze", "semantic", "--trace", str(trace), "--out", str(out / "sem")],
    }


@pytest.mark.parametrize("table", TABLE_KINDS)
def test_every_analysis_refuses_a_damaged_shard(clean, tmp_path, capsys, table):
    trace, shard = damaged(clean, tmp_path, table)
    with pytest.raises(TraceError, match="damaged"):
        moescope.open_trace(trace)
    for name, args in analyze_commands(trace, clean, tmp_path).items():
        code, err = run_cli(args, capsys)
        assert_one_line_error(code, err, shard, "damaged", "capture")
        assert not (tmp_path / name).exists() or not any((tmp_path / name).rglob("results.json")), name
    # inspect still reports it as a validation problem (it does not stop at opening)
    code, err = run_cli(["inspect", str(trace)], capsys)
    assert code != 0 and "failed validation" in err


def test_a_truncated_or_missing_shard_is_refused_by_size(clean, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(clean, out)
    shard = next((out / "routes").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(TraceError, match=r"bytes, the manifest says"):
        moescope.open_trace(out)
    shard.unlink()
    with pytest.raises(TraceError, match="missing"):
        moescope.open_trace(out)


def test_the_intact_trace_opens_and_is_hashed_once_per_process(clean, monkeypatch):
    import moescope.store.reader as reader

    moescope.open_trace(clean)  # verified (and remembered)
    calls = []
    monkeypatch.setattr(reader, "sha256_file", lambda p: calls.append(p))
    assert moescope.open_trace(clean).scalar("SELECT count(*) FROM sequences") == 16
    assert calls == []
