"""Glue of the semantic study, where the file I/O lives: probes -> JSONL -> trace -> analysis.

The probe file (``probes.jsonl``, the capture's input) has one line per context sentence:

    {"text": ..., "probe": "wic" | "sub", "item": "wic-000012", "role": "a" | "b" |
     "original" | "substitute" | "control", "label": "same" | "different" | "",
     "lemma": ..., "target_pos": "n" | "v" | "a" | "r" | "", "sense": ..., "word": ...,
     "target_start": 4, "target_end": 8, "source": "wordnet-3.0" | "wic" | "swords"}

``target_start``/``target_end`` are character offsets of the target (or of the word put in
its place) in ``text``. Line i (0-based) becomes sequence i of the trace and these fields
become columns of its ``sequences`` table, so a trace captured from it carries its probes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from moescope.analysis.result import AnalysisResult
from moescope.analysis.semantic import SemanticParams, analyze_semantic
from moescope.errors import DataError
from moescope.semantic.align import align_targets
from moescope.semantic.probes import Context, SensePair, SubstitutionItem

__all__ = ["probe_records", "write_probes", "read_probes", "trace_contexts", "build_probes", "analyse_trace"]

FIELDS = ("probe", "item", "role", "label", "lemma", "target_pos", "sense", "word", "target_start", "target_end",
          "source")
NEEDED = ("probe", "item", "role", "target_start", "target_end")


def _record(ctx: Context, **meta: Any) -> dict[str, Any]:
    return {"text": ctx.text, **meta, "word": ctx.word, "target_start": ctx.start, "target_end": ctx.end}


def probe_records(pairs: list[SensePair], items: list[SubstitutionItem], *, wic_source: str = "wordnet-3.0",
                  sub_source: str = "wordnet-3.0") -> list[dict[str, Any]]:
    """The probe file's lines: two per sense pair, 1 + substitutes + controls per item."""
    out = []
    for p in pairs:
        for role, ctx, sense in (("a", p.a, p.sense_a), ("b", p.b, p.sense_b)):
            out.append(_record(ctx, probe="wic", item=p.item_id, role=role, label=p.label, lemma=p.lemma,
                               target_pos=p.pos, sense=sense, source=wic_source))
    for it in items:
        meta = dict(probe="sub", item=it.item_id, label="", lemma=it.lemma, target_pos=it.pos, sense=it.sense,
                    source=sub_source)
        out.append(_record(it.original, role="original", **meta))
        for role, words in (("substitute", it.substitutes), ("control", it.controls)):
            out += [_record(it.original.replace(w), role=role, **meta) for w in words]
    return [r for r in out if r["text"].strip()]


def write_probes(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write the probe file (deterministic bytes for the same records); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def _contexts_table(rows: list[dict[str, Any]], seq_ids: list[int], where: str) -> pa.Table:
    for name in NEEDED:
        bad = next((i for i, r in zip(seq_ids, rows) if r.get(name) in (None, "")), None)
        if bad is not None:
            raise DataError(f"{where}: context {bad} has no {name!r}; was it written by moescope analyze semantic?")
    cols: dict[str, Any] = {"seq_id": pa.array(seq_ids, pa.uint32()), "text": [r.get("text") for r in rows]}
    for name in FIELDS:
        values = [r.get(name) for r in rows]
        cols[name] = pa.array(values, pa.int64()) if name in ("target_start", "target_end") else \
            pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(cols)


def read_probes(path: str | Path) -> pa.Table:
    """The probe file as a contexts table (seq_id = line index among non-blank lines, + FIELDS)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"probe file {path} does not exist; pass the probes.jsonl written by moescope analyze semantic")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {n}: not valid JSON ({exc.msg})") from exc
    return _contexts_table(rows, list(range(len(rows))), str(path))


def trace_contexts(trace: Any) -> pa.Table:
    """The contexts a trace was captured from, read from its sequences table."""
    columns = trace.columns("sequences")
    missing = [c for c in NEEDED if c not in columns]
    if missing:
        raise DataError(
            f"{trace.path} has no probe metadata ({', '.join(missing)} missing from its sequences); "
            "pass --probes FILE with the probes.jsonl it was captured from"
        )
    table = trace.table("sequences", columns=["seq_id", "text", *[c for c in FIELDS if c in columns]])
    return _contexts_table(table.to_pylist(), table.column("seq_id").to_pylist(), str(trace.path))


def _check_match(trace: Any, contexts: pa.Table, probes: Path) -> None:
    """DataError unless every probe line's text is the trace's sequence of the same id."""
    seqs = trace.table("sequences", columns=["seq_id", "text"])
    texts = dict(zip(seqs.column("seq_id").to_pylist(), seqs.column("text").to_pylist()))
    for seq_id, text in zip(contexts.column("seq_id").to_pylist(), contexts.column("text").to_pylist()):
        if texts.get(seq_id) != text:
            raise DataError(
                f"{probes} line {seq_id + 1} is not sequence {seq_id} of {trace.path}; "
                "pass the probes.jsonl this trace was captured from"
            )


def build_probes(
    *, n_pairs: int, n_items: int, seed: int = 0, wic: Path | None = None, swords: Path | None = None,
    wordnet: Path | None = None,
) -> list[dict[str, Any]]:
    """Probe records: sense pairs from WiC (if given) or WordNet, items from SWORDS (if given) or WordNet."""
    from moescope.semantic import loaders, probes
    from moescope.wordnet import DEFAULT_DIR

    root = wordnet or DEFAULT_DIR
    if wic is not None:
        pairs = loaders.load_wic(wic, n_pairs=n_pairs, seed=seed)
    else:
        pairs = probes.wordnet_pairs(n_pairs, seed=seed, root=root) if n_pairs else []
    if swords is not None:
        items = loaders.load_swords(swords, n_items=n_items, seed=seed)
    else:
        items = probes.wordnet_substitutions(n_items, seed=seed, root=root) if n_items else []
    return probe_records(pairs, items, wic_source="wic" if wic else "wordnet-3.0",
                         sub_source="swords" if swords else "wordnet-3.0")


def target_routes(trace: Any, targets: pa.Table) -> pa.Table:
    """Routes rows (seq_id, pos, layer, experts) of the target tokens only (a DuckDB join)."""
    con = trace.con
    con.register("_semantic_targets", targets.select(["seq_id", "pos"]))
    try:
        return con.sql(
            "SELECT r.seq_id, r.pos, r.layer, r.experts FROM routes r "
            "JOIN _semantic_targets t ON r.seq_id = t.seq_id AND r.pos = t.pos"
        ).fetch_arrow_table()
    finally:
        con.unregister("_semantic_targets")


def analyse_trace(trace_dir: str | Path, probes: str | Path | None = None, *,
                  params: SemanticParams = SemanticParams()) -> AnalysisResult:
    """Run the semantic analysis on a captured trace (contexts from `probes` or the trace itself)."""
    from moescope import open_trace

    trace = open_trace(trace_dir)
    if probes is not None:
        contexts = read_probes(probes)
        _check_match(trace, contexts, Path(probes))
    else:
        contexts = trace_contexts(trace)
    tokens = trace.table("tokens", columns=[c for c in ("seq_id", "pos", "token_id", "phase", "char_start",
                                                         "char_end") if c in trace.columns("tokens")],
                         filter=pc.field("seq_id").isin(contexts.column("seq_id")))
    targets = align_targets(tokens, contexts, params.subword)
    routes = target_routes(trace, targets)
    result = analyze_semantic(contexts, targets, routes, n_experts=trace.n_experts, top_k=trace.top_k,
                              layers=trace.moe_layers, params=params, trace=str(trace.path))
    sources = {p: sorted({s for s, q in zip(contexts.column("source").to_pylist(), contexts.column("probe").to_pylist())
                          if q == p and s}) for p in ("wic", "sub")}
    result.values["model"] = trace.model.get("name_or_path")
    result.values["probe_sources"] = {"sense_pairs": sources["wic"], "substitution": sources["sub"]}
    return result
