"""Ctrl-C stops a capture with status 130 and a resumable trace; a second capture into the same
directory is refused while the first runs (the lock across real processes: test_resume.py)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import moescope
from moescope.store.validate import validate

from test_store import write_jsonl

MOESCOPE = [sys.executable, "-m", "moescope.cli"]


def committed_shards(out) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1


def test_sigint_exits_130_and_the_same_command_resumes(tiny_dir, tmp_path):
    n = 600  # a quiet machine is still capturing when the signal lands after the first shard
    data = write_jsonl(tmp_path / "d.jsonl", n)
    out = tmp_path / "t"
    cmd = MOESCOPE + ["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
                      "--batch-size", "8", "--shard-rows", "200"]
    # SIG_DFL in the child: a test run started in the background by a non-interactive shell
    # inherits SIGINT ignored (bash does that to background jobs), and Python then installs no
    # KeyboardInterrupt handler, so the signal would be lost whatever moescope does
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while committed_shards(out) < 1 and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the capture ended before it could be interrupted; make the data bigger"
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "interrupted;" in err and "the same command resumes it" in err and "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards"]

    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at sequence" in resumed.stderr and f"of {n}" in resumed.stderr
    trace = moescope.open_trace(out)
    assert trace.rows("SELECT count(*), count(DISTINCT seq_id), min(seq_id), max(seq_id) FROM sequences") == [
        (n, n, 0, n - 1)]
    assert validate(trace).ok


def test_a_capture_into_a_directory_another_writer_holds_is_refused(tiny_dir, tmp_path, capsys):
    import os

    from moescope.store.lock import TraceLock
    from test_cli_errors import assert_one_line_error, run_cli

    data = write_jsonl(tmp_path / "d.jsonl", 4)
    lock = TraceLock(tmp_path / "t")  # stands for a capture running in another process
    try:
        code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "t")],
                            capsys)
    finally:
        lock.release()
    assert_one_line_error(code, err, "being written by another process", f"pid {os.getpid()}")
    assert not (tmp_path / "t/manifest.json").exists()
    code, _ = run_cli(["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "t")], capsys)
    assert code == 0
