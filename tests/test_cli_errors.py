"""Bad input gets one clear line and a non-zero exit, never a traceback or a half-written trace."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from moescope.cli import main

from conftest import build_tokenizer


def run_cli_captured(args: list[str], capsys) -> tuple[int, Any]:
    """Run `moescope ARGS` in this process; returns (exit code, capsys' captured out and err)."""
    old = sys.argv
    sys.argv = ["moescope", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old
    return code, capsys.readouterr()


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Run `moescope ARGS` in this process; returns (exit code, stderr)."""
    code, captured = run_cli_captured(args, capsys)
    return code, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def data(tmp_path):
    return write(tmp_path / "ok.jsonl", [json.dumps({"text": f"hello world {i}", "label": "a"}) for i in range(4)])


def test_model_without_moe_layers(tmp_path, data, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer(tmp_path / "dense")
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    code, err = run_cli(["capture", "--model", str(tmp_path / "dense"), "--data", str(data), "--out", str(tmp_path / "t")], capsys)
    assert_one_line_error(code, err, "no MoE layers")
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_unknown_model_type_says_how_to_add_an_adapter():
    from moescope.adapters.registry import family_for
    from moescope.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="did you mean olmoe.*add a Family"):
        family_for("olmoee")


def test_architecture_transformers_does_not_know(tmp_path, data, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text(json.dumps({"model_type": "no_such_moe"}))
    (tmp_path / "m/model.safetensors").write_bytes(b"")
    code, err = run_cli(["capture", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "t")], capsys)
    assert_one_line_error(code, err, "does not know the architecture")


def test_remote_code_needs_a_flag(tmp_path, data, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text(json.dumps({
        "model_type": "custom_moe",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    (tmp_path / "m/model.safetensors").write_bytes(b"")
    code, err = run_cli(["capture", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "t")], capsys)
    assert_one_line_error(code, err, "--trust-remote-code")


def test_pickle_weights_are_refused(tmp_path, tiny_dir, data, capsys):
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_dir, model)
    (model / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
    code, err = run_cli(["capture", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "t")], capsys)
    assert_one_line_error(code, err, "pickle", "--allow-pickle")


@pytest.mark.parametrize(
    "name, lines, needles",
    [
        ("bad.jsonl", ['{"text": "fine"}', '{"text": "also fine"}', '{"text": broken'], ("line 3", "not valid JSON")),
        ("notext.jsonl", ['{"text": "fine"}', '{"label": "no text here"}'], ("line 2", "'text'")),
        ("empty.jsonl", ['{"text": "fine"}', '{"text": "   "}'], ("line 2", "empty text", "--skip-empty")),
        ("empty.txt", ["first", "", "third"], ("line 2", "empty text")),
        ("data.csv", ["text", "x"], ("unknown data format",)),
    ],
)
def test_bad_data_files(tmp_path, tiny_dir, capsys, name, lines, needles):
    path = write(tmp_path / name, lines)
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(path), "--out", str(tmp_path / "t")], capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "t").exists()


def test_missing_data_file(tmp_path, tiny_dir, capsys):
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(tmp_path / "nope.jsonl"),
                         "--out", str(tmp_path / "t")], capsys)
    assert_one_line_error(code, err, "does not exist")


def test_texts_longer_than_the_context(tmp_path, tiny_dir, capsys):
    long = write(tmp_path / "long.jsonl", [json.dumps({"text": "word " * 200})])
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(long), "--out", str(tmp_path / "t"),
                         "--on-long", "refuse"], capsys)
    assert_one_line_error(code, err, "record 0", "longer than --max-length")
    trace = json.loads((tmp_path / "t/manifest.json").read_text())
    assert trace["complete"] is False  # nothing half-written looks complete
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(long), "--out", str(tmp_path / "t2"),
                         "--max-length", "100000"], capsys)
    assert_one_line_error(code, err, "exceeds the model's context")


def test_output_directory_holding_a_different_trace(tmp_path, tiny_dir, data, capsys):
    out = tmp_path / "t"
    code, _ = run_cli(["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(out)], capsys)
    assert code == 0
    other = write(tmp_path / "other.jsonl", [json.dumps({"text": "something else"})])
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(other), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "holds a different trace", "input.sha256", "--overwrite")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/file.txt").write_text("x")
    code, err = run_cli(["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "junk")], capsys)
    assert_one_line_error(code, err, "is not a trace")


def test_analysis_errors(tmp_path, tiny_dir, data, capsys):
    out = tmp_path / "t"
    run_cli(["capture", "--model", str(tiny_dir), "--data", str(data), "--out", str(out)], capsys)
    code, err = run_cli(["analyze", "signatures", str(out), "--label", "domain", "--out", str(tmp_path / "s")], capsys)
    assert_one_line_error(code, err, "domain")
    code, err = run_cli(["inspect", str(tmp_path / "nothing")], capsys)
    assert_one_line_error(code, err, "does not exist")
    code, err = run_cli(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")], capsys)
    assert_one_line_error(code, err, "does not exist")


def test_usage_errors_are_not_tracebacks():
    res = subprocess.run([sys.executable, "-m", "moescope.cli", "capture", "--nonsense"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "No such option" in res.stderr
