"""`moescope demo` end to end (on the tiny test model; the built-in model is exercised in the slow run)."""
from __future__ import annotations

import json
import sys

import pytest

from moescope.cli import main


def run(args, capsys):
    old, sys.argv = sys.argv, ["moescope", *args]
    try:
        main()
    finally:
        sys.argv = old
    return capsys.readouterr()


def test_demo_writes_traces_results_and_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    printed = run(["demo", "--out", str(out), "--model", str(tiny_dir), "--permutations", "20", "--generate", "4"], capsys)
    assert "Open the report" in printed.out and str((out / "report.html").resolve()) in printed.out.replace("\n", "")
    for name in ("trace-tasks", "trace-shared-vocabulary"):
        assert json.loads((out / name / "manifest.json").read_text())["complete"]
    tasks = json.loads((out / "signatures-tasks" / "results.json").read_text())
    assert tasks["labels"] == ["code", "factual", "math", "story"]
    for key in ("cv_accuracy_mean", "permutation_accuracy_mean", "bag_of_tokens_accuracy_mean",
                "token_id_control_accuracy_mean", "load_balanced_accuracy_mean"):
        assert 0 <= tasks[key] <= 1
    shared = json.loads((out / "signatures-shared-vocabulary" / "results.json").read_text())
    assert shared["labels"] == ["factual", "question", "story"]
    html = (out / "report.html").read_text()
    assert "Routing signatures by label (trace-tasks)" in html
    assert "Routing signatures by label (trace-shared-vocabulary)" in html
    assert html.count('type="application/json"') >= 2  # a token viewer per trace
    # rerunning reuses the finished captures
    before = (out / "trace-tasks" / "manifest.json").stat().st_mtime_ns
    run(["demo", "--out", str(out), "--model", str(tiny_dir), "--permutations", "20", "--generate", "4"], capsys)
    assert (out / "trace-tasks" / "manifest.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_demo_on_the_built_in_model(tmp_path, capsys):
    from moescope.capture.loading import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.fail("the built-in default model is missing from the package")
    printed = run(["demo", "--out", str(tmp_path / "demo")], capsys)
    assert "Open the report" in printed.out
