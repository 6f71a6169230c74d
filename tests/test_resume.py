"""Resuming a capture: never two models in one trace; the same model however its path is spelled;
options that do not change what is recorded may change; one writer per trace directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moescope
from moescope.capture.dataset import RunOptions, capture_dataset
from moescope.capture.identity import files_digest, weights_identity
from moescope.capture.loading import load_model
from moescope.errors import TraceError
from moescope.store.lock import TraceLock
from moescope.store.validate import validate

from conftest import build_tiny_olmoe
from test_store import _tables, write_jsonl

MOESCOPE = [sys.executable, "-m", "moescope.cli"]


class Stop(Exception):
    """Stands for an interruption after some shards are committed."""


def partial_capture(model, tok, data: Path, out: Path, shards: int, **kw) -> int:
    """Run a capture and stop it once `shards` shards are committed; returns how many are."""
    def progress(*_: int) -> None:
        manifest = json.loads((out / "manifest.json").read_text())
        if len(manifest["shards"]) >= shards:
            raise Stop

    with pytest.raises(Stop):
        capture_dataset(model, tok, data, out, progress=progress, **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    return len(manifest["shards"])


@pytest.fixture(scope="module")
def setting(tiny_dir, tmp_path_factory):
    """A copy of the tiny model (so it can be replaced), data, and a clean reference trace."""
    root = tmp_path_factory.mktemp("resume")
    model_dir = root / "model"
    shutil.copytree(tiny_dir, model_dir)
    data = write_jsonl(root / "d.jsonl", 48)
    model, tok = load_model(str(model_dir))
    capture_dataset(model, tok, data, root / "clean", run=RunOptions(batch_size=4, shard_rows=300))
    return root, model_dir, data


def test_new_weights_at_the_same_path_are_refused_naming_the_weights(setting, tmp_path, capsys):
    root, model_dir, data = setting
    moved = tmp_path / "model"
    shutil.copytree(model_dir, moved)
    model, tok = load_model(str(moved))
    out = tmp_path / "t"
    partial_capture(model, tok, data, out, 2, run=RunOptions(batch_size=4, shard_rows=300), model_name=str(moved))
    build_tiny_olmoe(len(tok), seed=1).save_pretrained(moved)  # other weights, same path, same config
    other, tok2 = load_model(str(moved))
    with pytest.raises(TraceError, match=r"model\.weights\.digest") as err:
        capture_dataset(other, tok2, data, out, run=RunOptions(batch_size=4, shard_rows=300), model_name=str(moved))
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    # the CLI says the same in one line
    from test_cli_errors import assert_one_line_error, run_cli

    code, err = run_cli(["capture", "--model", str(moved), "--data", str(data), "--out", str(out),
                         "--batch-size", "4", "--shard-rows", "300"], capsys)
    assert_one_line_error(code, err, "holds a different trace", "model.weights.digest", "--overwrite")


def test_an_in_memory_model_changed_after_the_first_run_is_refused(setting, tmp_path):
    root, model_dir, data = setting
    model, tok = load_model(str(model_dir))
    out = tmp_path / "t"
    partial_capture(model, tok, data, out, 1, run=RunOptions(batch_size=4, shard_rows=300))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("gate.weight"))[0, 0] += 1e-3
    with pytest.raises(TraceError, match="weights"):
        capture_dataset(model, tok, data, out, run=RunOptions(batch_size=4, shard_rows=300))


def test_same_model_by_another_path_spelling_and_batch_size_resumes(setting, tmp_path, monkeypatch):
    root, model_dir, data = setting
    model, tok = load_model(str(model_dir))
    out = tmp_path / "t"
    partial_capture(model, tok, data, out, 2, run=RunOptions(batch_size=4, shard_rows=300),
                    model_name=str(model_dir) + "/")
    monkeypatch.chdir(model_dir.parent)
    notes: list[str] = []
    relative, tok2 = load_model("model")  # relative path, another batch size: the same recorded content
    manifest = capture_dataset(relative, tok2, data, out, run=RunOptions(batch_size=8, shard_rows=300),
                               model_name="model", notify=notes.append)
    assert manifest["complete"]
    assert any(line.startswith("resuming at sequence ") and "of 48" in line for line in notes), notes
    assert {s["batch_size"] for s in manifest["shards"]} == {4, 8}  # each shard says how it was run
    clean, resumed = _tables(root / "clean"), _tables(out)
    assert resumed["sequences"].column("seq_id").to_pylist() == list(range(48))  # every sequence once
    for name in clean:
        for col in ("seq_id", "pos", "layer", "experts", "token_id"):
            if col in clean[name].column_names:
                assert clean[name].column(col).equals(resumed[name].column(col)), (name, col)
    assert validate(moescope.open_trace(out)).ok
    again: list[str] = []
    capture_dataset(relative, tok2, data, out, run=RunOptions(batch_size=8, shard_rows=300), notify=again.append)
    assert any("already complete" in line for line in again), again


def test_a_differing_option_is_named(setting, tmp_path):
    root, model_dir, data = setting
    model, tok = load_model(str(model_dir))
    out = tmp_path / "t"
    partial_capture(model, tok, data, out, 1, run=RunOptions(batch_size=4, shard_rows=300))
    with pytest.raises(TraceError, match=r"capture\.max_length \(32 here, 64 in the trace\)"):
        capture_dataset(model, tok, data, out, run=RunOptions(batch_size=4, shard_rows=300, max_length=32))


def test_large_models_are_identified_by_sampled_values_and_files(tiny_dir, tmp_path, monkeypatch):
    import moescope.capture.identity as identity

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dir, model_dir)
    model, _ = load_model(str(model_dir))
    exact = weights_identity(model, str(model_dir))
    assert exact["method"] == "sha256 of all parameters"
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 0)  # as if the model were too big to hash whole
    big = weights_identity(model, str(model_dir))
    assert big["method"].startswith("sha256 of 4096 sampled values") and big["files"] == files_digest(model_dir)
    assert weights_identity(model, str(model_dir) + "/") == big  # path spelling does not matter
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten file
    assert weights_identity(model, str(model_dir))["files"] != big["files"]
    # A hub model: its commit, and the cache's blobs, which are named by their content's SHA-256.
    import huggingface_hub

    snapshot = tmp_path / "hub/models--org--m/snapshots/abc123"
    blobs = tmp_path / "hub/models--org--m/blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    blob = blobs / ("a" * 64)
    shutil.copy(weights, blob)
    (snapshot / "model.safetensors").symlink_to(blob)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, revision=None: str(snapshot / name) if revision == "abc123" else None)
    model.config._commit_hash = "abc123"
    hub = weights_identity(model, "org/m")
    assert hub["commit"] == "abc123" and hub["files"] == files_digest(snapshot)
    os.utime(blob, ns=(0, 0))  # a blob's time does not matter: its name is its content
    assert weights_identity(model, "org/m") == hub


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    lock = TraceLock(tmp_path / "t")
    child = subprocess.run([sys.executable, "-c", "from moescope.store.lock import TraceLock; "
                            f"TraceLock({str(tmp_path / 't')!r})"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert child.returncode != 0 and f"pid {os.getpid()}" in child.stderr
    lock.release()
    # a holder killed with -9 leaves no stale lock: the OS drops it with the process
    holder = subprocess.Popen([sys.executable, "-c", "import time; from moescope.store.lock import TraceLock; "
                               f"l = TraceLock({str(tmp_path / 't')!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TraceError, match=f"pid {holder.pid}"):
        TraceLock(tmp_path / "t")
    holder.kill()
    holder.wait()
    TraceLock(tmp_path / "t").release()
