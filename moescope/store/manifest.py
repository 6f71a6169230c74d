"""manifest.json: what a trace holds, and the commit record of its shards.

A shard is listed in the manifest only after all its files are fully written and renamed
into place, so the manifest is the single source of truth: files it does not list are
leftovers of an interrupted capture and are deleted on resume.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from moescope.errors import TraceError
from moescope.schema import FORMAT_NAME, FORMAT_VERSION

MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk for the commit to survive a power cut.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(trace_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically replace TRACE/manifest.json."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(Path(trace_dir) / MANIFEST, text.encode("utf-8"))


def read_manifest(trace_dir: Path) -> dict[str, Any]:
    """The parsed manifest of a trace directory; TraceError if missing or not a moescope trace."""
    path = Path(trace_dir) / MANIFEST
    if not Path(trace_dir).exists():
        raise TraceError(f"no trace at {trace_dir}: the directory does not exist")
    if not path.exists():
        raise TraceError(f"{trace_dir} is not a trace: it has no {MANIFEST} (capture one with `moescope capture`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{path} is unreadable ({exc}); the trace is damaged, capture it again") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise TraceError(f"{path} is not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TraceError(
            f"{path} has trace format version {version!r}; this moescope reads up to {FORMAT_VERSION}: upgrade moescope"
        )
    return manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable short hash of JSON-serialisable capture identity (model, data, options)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def identity_differences(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable fields that differ between two identities, e.g.
    "model.weights.digest (1f2e3d4c… here, 9a8b7c6d… in the trace)"."""
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, name + ".")
        else:
            out.append(f"{name} ({_short(a)} here, {_short(b)} in the trace)")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text[:12] + "…" if len(text) > 16 else text
