"""Capture on a local Ray cluster (2 CPU workers): the same trace as one process, resumable both ways."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moescope
from moescope.capture.dataset import RunOptions, capture_dataset
from moescope.store.validate import validate

# Keep the test cluster on loopback: Ray otherwise takes the machine's network address as the
# node's (it does so on Linux only; this switch selects its macOS/Windows single-machine mode).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'moescope[ray]')")

from moescope.capture.distributed import RayOptions, capture_distributed, plan_chunks  # noqa: E402

RUN = RunOptions(batch_size=4, shard_rows=300)
KEYS = {"sequences": ["seq_id"], "tokens": ["seq_id", "pos"], "routes": ["seq_id", "pos", "layer"]}


def write_jsonl(path: Path, n: int) -> Path:
    words = "alpha beta gamma delta fox river code print sum story moon".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(words[(i * 5 + j) % len(words)] for j in range(2 + i % 13))
            f.write(json.dumps({"text": text, "label": ["code", "story", "math"][i % 3]}) + "\n")
    return path


def tables(trace_dir: Path) -> dict:
    trace = moescope.open_trace(trace_dir)
    return {name: trace.table(name).sort_by([(k, "ascending") for k in keys]) for name, keys in KEYS.items()}


def assert_same_trace(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    for name in KEYS:
        assert ta[name].equals(tb[name]), f"{name} differs"
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["fingerprint"] == mb["fingerprint"] and mb["complete"]
    assert mb["totals"] == ma["totals"]
    assert validate(moescope.open_trace(b)).ok


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def save_manifest(path: Path, m: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs on loopback, shut down after the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 << 20)
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ray-data") / "d.jsonl", 44)


@pytest.fixture(scope="module")
def reference(tiny_dir, data, tmp_path_factory) -> Path:
    """The single-process trace, captured with one torch thread like each Ray worker."""
    out = tmp_path_factory.mktemp("ray-ref") / "single"
    capture_single_process(tiny_dir, data, out)
    return out


def capture_single_process(model_dir: Path, data: Path, out: Path) -> None:
    """capture_dataset in this process with one torch thread, like each Ray worker (resumes `out`)."""
    from moescope.capture.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(str(model_dir))
        capture_dataset(model, tok, data, out, run=RUN, model_name=str(model_dir))
    finally:
        torch.set_num_threads(threads)


def test_plan_chunks_cut_pending_ranges():
    assert plan_chunks([(0, 10), (16, 20)], 4) == [(0, 4), (4, 8), (8, 10), (16, 20)]


def test_cli_ray_capture_equals_single_process(cluster, tiny_dir, data, reference, tmp_path):
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "moescope.cli", "capture", "--engine", "ray", "--num-workers", "2",
           "--ray-address", cluster, "--chunk-size", "8", "--model", str(tiny_dir), "--data", str(data),
           "--out", str(out), "--batch-size", "4", "--shard-rows", "300"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_trace(reference, out)
    m = manifest(out)
    starts = [s["input_start"] for s in m["shards"]]
    assert starts == sorted(starts) and len(starts) == 6  # 44 records in chunks of 8, listed in input order
    assert all(f["path"].split("/")[1].startswith("part-r") for s in m["shards"] for f in s["files"].values())


def test_killed_ray_run_resumes_in_one_process(cluster, tiny_dir, data, reference, tmp_path):
    out = tmp_path / "partial"
    m = capture_distributed(str(tiny_dir), data, out, run=RUN, model_name=str(tiny_dir),
                            ray_options=RayOptions(num_workers=2, chunk_size=8, max_chunks=3))
    assert not m["complete"] and len(m["shards"]) == 3
    # A worker wrote its chunk but the driver died before committing it: files on disk, not listed.
    lost = m["shards"].pop(1)
    save_manifest(out, m)
    capture_single_process(tiny_dir, data, out)
    assert_same_trace(reference, out)
    assert not (out / lost["files"]["routes"]["path"]).exists()  # the uncommitted chunk was redone, not mixed in
    trace = moescope.open_trace(out)
    assert trace.rows("SELECT count(*), count(DISTINCT seq_id) FROM sequences") == [(44, 44)]


def test_ray_fills_the_gaps_of_a_single_process_trace(cluster, tiny_dir, data, reference, tmp_path):
    out = tmp_path / "gaps"
    import shutil

    shutil.copytree(reference, out)
    m = manifest(out)
    assert len(m["shards"]) >= 4
    m["shards"] = [m["shards"][0]] + m["shards"][2:-1]  # two holes: one in the middle, one at the end
    m["complete"] = False
    save_manifest(out, m)
    capture_distributed(str(tiny_dir), data, out, run=RUN, model_name=str(tiny_dir),
                        ray_options=RayOptions(num_workers=2, chunk_size=8))
    assert_same_trace(reference, out)
    names = sorted(f["path"] for s in manifest(out)["shards"] for f in s["files"].values() if "routes" in f["path"])
    assert any("part-r" in n for n in names) and any("part-0" in n for n in names)


def test_a_worker_user_error_is_one_line(cluster, tiny_dir, tmp_path):
    from moescope.errors import DataError

    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "short text"}) + "\n" for _ in range(6))
                    + json.dumps({"text": "word " * 300}) + "\n")
    with pytest.raises(DataError, match="record 6 is .* tokens, longer than --max-length"):
        capture_distributed(str(tiny_dir), data, tmp_path / "t", run=RunOptions(batch_size=4, on_long="refuse"),
                            ray_options=RayOptions(num_workers=2, chunk_size=4))


def test_sigkill_of_the_ray_driver_mid_run_then_resume_gives_every_sequence_once(cluster, tiny_dir, tmp_path):
    import signal
    import time

    n = 120
    data = write_jsonl(tmp_path / "d.jsonl", n)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moescope.cli", "capture", "--engine", "ray", "--num-workers", "2",
           "--ray-address", cluster, "--chunk-size", "4", "--model", str(tiny_dir), "--data", str(data),
           "--out", str(out), "--batch-size", "4", "--shard-rows", "300"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 170
    committed = 0
    while time.time() < deadline and driver.poll() is None:
        try:
            committed = len(manifest(out)["shards"])
        except (OSError, ValueError, KeyError):
            committed = 0
        if committed >= 3:  # mid-run: some chunks committed, most still to do
            break
        time.sleep(0.01)
    assert driver.poll() is None, "the Ray capture ended before it could be killed: " + driver.stderr.read()[-2000:]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    m = manifest(out)
    assert not m["complete"] and 0 < sum(s["n_sequences"] for s in m["shards"]) < n  # killed before completion
    capture_single_process(tiny_dir, data, out)  # the dead driver's lock is gone with it
    trace = moescope.open_trace(out)
    assert trace.rows("SELECT count(*), count(DISTINCT seq_id), min(seq_id), max(seq_id) FROM sequences") == [
        (n, n, 0, n - 1)]
    assert validate(trace).ok
