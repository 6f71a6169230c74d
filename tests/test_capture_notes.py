"""What capture and inspect tell the user: fields, truncation, skipped records, resume points."""
from __future__ import annotations

import json

import moescope
from moescope.capture.data import TextDataset

from test_cli_errors import assert_one_line_error, run_cli, write


def inspect_text(trace, capsys) -> str:
    """`moescope inspect TRACE`'s standard output, whitespace-normalised (rich wraps lines)."""
    import sys

    from moescope.cli import main

    capsys.readouterr()
    old, sys.argv = sys.argv, ["moescope", "inspect", str(trace)]
    try:
        main()
    finally:
        sys.argv = old
    return " ".join(capsys.readouterr().out.split())


def test_notes_fields_truncation_and_inspect(tiny_dir, tmp_path, capsys):
    rows = [{"text": "hello world", "seq_id": 7, "generated_text": "x", "label": "a"},
            {"text": "", "seq_id": 8, "generated_text": "y", "label": "b"},  # skipped: seq_ids keep file indices
            {"text": "word " * 200, "seq_id": 9, "generated_text": "z", "label": "c"},
            {"text": "the end", "seq_id": 10, "generated_text": "w", "label": "d"}]
    data = write(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    out = tmp_path / "t"
    args = ["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--skip-empty"]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    assert "input field 'seq_id' is stored as 'input_seq_id'" in err
    assert "input field 'generated_text' is stored as 'input_generated_text'" in err
    assert "1 empty text(s) skipped" in err
    notes = [line for line in err.splitlines() if "truncated" in line]
    assert len(notes) == 1 and notes[0].startswith("note: 1 text(s) were longer than") and "UserWarning" not in err
    trace = moescope.open_trace(out)
    assert trace.rows("SELECT seq_id, input_seq_id, input_generated_text, truncated FROM sequences ORDER BY seq_id") == [
        (0, 7, "x", False), (2, 9, "z", True), (3, 10, "w", False)]  # seq_id = the record's index in the file

    code, err = run_cli(args, capsys)
    assert code == 0 and "already complete" in err

    text = inspect_text(out, capsys)
    assert "input_seq_id (int)" in text and "renamed: seq_id -> input_seq_id" in text
    assert "truncated texts 1 " in text


def test_inspect_lists_fields_scores_and_hidden_rate(tiny_dir, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [json.dumps({"text": f"hello world {i}", "domain": "code", "n": i})
                                        for i in range(6)])
    out = tmp_path / "t"
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
                         "--hidden-rate", "0.5", "--router-scores", "probs"], capsys)
    assert code == 0, err
    text = inspect_text(out, capsys)
    assert "metadata fields domain (str), n (int)" in text
    assert "router scores router_probs" in text
    assert "hidden states" in text and "requested rate 0.5" in text
    assert "truncated texts 0" in text


def test_a_missing_text_field_mentions_text_field(tmp_path, tiny_dir, capsys):
    data = write(tmp_path / "d.jsonl", [json.dumps({"body": "hello"})])
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "t")],
                        capsys)
    assert_one_line_error(code, err, "'text' is missing", "--text-field", "body")
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "t"),
                         "--text-field", "body"], capsys)
    assert code == 0, err


def test_reserved_and_renamed_field_both_present_is_refused(tmp_path):
    import pytest

    from moescope.errors import DataError

    data = write(tmp_path / "d.jsonl", [json.dumps({"text": "a", "seq_id": 1, "input_seq_id": 2})])
    with pytest.raises(DataError, match="'seq_id' and 'input_seq_id' both present"):
        TextDataset(data)
