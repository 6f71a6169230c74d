"""Synthetic traces for the report tests: known routes, weights, phases and hostile token text."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from moescope.store.tables import write_trace

E, K, LAYERS = 8, 2, [1, 3]

# Token texts that must reach the reader literally and never as markup or script.
HOSTILE = [
    "<script>alert(1)</script>", ' "quotes"', " 'single'", " &amp;", "</script>", "\u2028",
    " 🙂", " שלום", "\u0301", "<img src=x onerror=alert(2)>", " \u202eevil",
]
HOSTILE_TEXT = "".join(HOSTILE)
WHITESPACE = ["def", " f", "():", "\n", "    ", "return", " 1", "\n\n", "", "\t", "x"]
GENERATED_FROM = 6  # tokens of sequence 1 from this position on are 'generated'


def top1(seq: int, pos: int, layer_index: int, n_experts: int = E) -> int:
    """The planted top-1 expert (different at the two layers for most tokens)."""
    return (pos * 3 + layer_index * 5 + seq) % n_experts


def make_trace(path: Path, *, n_long: int = 30, n_experts: int = E, weights: bool = True) -> Path:
    """A trace of 3 sequences: hostile text, whitespace with generated tokens, a long one of `n_long` tokens."""
    texts = [HOSTILE, WHITESPACE, [f" w{i}" for i in range(n_long)]]
    tokens = {"seq_id": [], "pos": [], "token_id": [], "phase": [], "token": []}
    routes = {"seq_id": [], "pos": [], "layer": [], "experts": [], "weights": []}
    for s, toks in enumerate(texts):
        for pos, text in enumerate(toks):
            tokens["seq_id"].append(s)
            tokens["pos"].append(pos)
            tokens["token_id"].append(100 * s + pos)
            tokens["phase"].append("generated" if s == 1 and pos >= GENERATED_FROM else "prompt")
            tokens["token"].append(text)
            for li, layer in enumerate(LAYERS):
                first = top1(s, pos, li, n_experts)
                routes["seq_id"].append(s)
                routes["pos"].append(pos)
                routes["layer"].append(layer)
                routes["experts"].append([first, (first + 1 + li) % n_experts])
                routes["weights"].append([0.7, 0.3] if li == 0 else [0.625, 0.375])
    id_type = pa.uint8() if n_experts <= 256 else pa.uint16()
    route_table = pa.table({
        "seq_id": pa.array(routes["seq_id"], pa.uint32()),
        "pos": pa.array(routes["pos"], pa.uint32()),
        "layer": pa.array(routes["layer"], pa.uint16()),
        "experts": pa.array(routes["experts"], pa.list_(id_type)),
        **({"weights": pa.array([np.float16(w).tolist() for w in routes["weights"]], pa.list_(pa.float16()))}
           if weights else {}),
    })
    sequences = pa.table({
        "seq_id": pa.array([0, 1, 2], pa.uint32()),
        "text": ["".join(t) for t in texts],
        "label": [HOSTILE_TEXT, "code", "prose"],
    })
    write_trace(path, routes=route_table, tokens=pa.table(tokens), sequences=sequences,
                model={"name_or_path": "synthetic <moe> & co", "family": "olmoe", "model_type": "olmoe",
                       "n_experts": n_experts, "top_k": K, "moe_layers": LAYERS, "n_layers": 4},
                capture={"mode": "generate", "generate": 5}, overwrite=True)
    return path


def tiny_png(width: int = 40, height: int = 20) -> bytes:
    """A valid grey PNG, enough to check that figures are embedded as data: URIs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xa0" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def make_results(path: Path, analysis: str, trace: str | None = None, **values) -> Path:
    """An analysis output directory with results.json (and a tiny PNG figure)."""
    (path / "figures").mkdir(parents=True, exist_ok=True)
    (path / "figures" / "plot.png").write_bytes(tiny_png())
    body = {"analysis": analysis, "moescope_version": "0.1.0", "trace": trace, "params": {"seed": 0},
            "figures": ["figures/plot.png"], **values}
    (path / "results.json").write_text(json.dumps(body), encoding="utf-8")
    return path
