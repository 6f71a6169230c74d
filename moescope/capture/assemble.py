"""Turn recorded groups into the trace's Arrow tables (off the capture hot path).

Rules applied here (see docs/trace-format.md):
- padding positions are dropped; `pos` counts a sequence's real tokens from 0;
- generated tokens follow the prompt (encoder-decoder: the decoder's tokens follow the
  encoder's); a sequence ends at its first EOS: later positions were batch padding;
- each token's experts are ordered by weight, descending (ties keep the model's order).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from moescope.capture.records import GENERATED, PROMPT, Group
from moescope.schema import HIDDEN_SCHEMA, expert_id_type, float_type, routes_schema, tokens_schema

if TYPE_CHECKING:
    from moescope.capture.recorder import Recorder


class TokenTexts:
    """Decoded text of single token ids, cached (each id is decoded once per tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str | None]:
        if self.tokenizer is None:
            return [None] * len(ids)
        missing = [int(i) for i in np.unique(ids) if int(i) not in self._cache]
        for i in missing:
            self._cache[i] = self.tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return [self._cache[int(i)] for i in ids]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.numpy()


def _list_array(values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    """A list<arrow_type> array from an (n, m) numpy block (every list of length m)."""
    n, m = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32)) if n else pa.array([0], pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=arrow_type))


def assemble_group(group: Group, rec: "Recorder", token_texts: TokenTexts | None = None) -> dict[str, pa.Table]:
    """Arrow tables (sequences, tokens, routes, hidden) of one closed group."""
    group.wait()
    if group.texts is None and rec.tokenizer is not None:
        # record() without expect(): the text is the decoded prompt; char spans index into it.
        group.texts, group.offsets = decoded_prompts(group, rec.tokenizer)
    token_texts = token_texts or TokenTexts(rec.tokenizer)
    batch = group.batch
    seq_ids = group.seq_ids.astype(np.uint32)
    counts = np.zeros(batch, dtype=np.int64)
    prompt_real = np.zeros(batch, dtype=np.int64)
    tok_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
    route_parts: list[dict[str, np.ndarray]] = []
    hidden_parts: list[tuple[np.ndarray, np.ndarray, int, np.ndarray]] = []

    for step in group.steps:
        mask = step.mask.numpy().astype(bool)
        mask[:, : step.first_new_col] = False
        pos = counts[:, None] + np.cumsum(mask, axis=1) - 1
        counts += mask.sum(axis=1)
        if step.phase == PROMPT:
            prompt_real = counts.copy()
        rows_b, rows_t = np.nonzero(mask)
        flat = rows_b * step.width + rows_t
        if step.token_ids is not None and not (group.generated is not None and step.phase == GENERATED):
            tok_parts.append((rows_b, pos[rows_b, rows_t], step.token_ids.numpy()[rows_b, rows_t], step.phase))
        for layer, lrec in sorted(step.layers.items()):
            if lrec.ids is not None:
                route_parts.append(_route_block(lrec, flat, rows_b, pos[rows_b, rows_t], layer))
            if lrec.hidden is not None and lrec.hidden_rows is not None:
                hrows = lrec.hidden_rows.numpy()
                hb, ht = hrows // step.width, hrows % step.width
                hidden_parts.append((hb, pos[hb, ht], layer, _np(lrec.hidden)))

    end = np.full(batch, np.iinfo(np.int64).max)
    if group.generated is not None:
        gen = group.generated.numpy()
        lengths = group.generated_lengths
        end = prompt_real + lengths
        gb = np.repeat(np.arange(batch), lengths)
        gj = np.concatenate([np.arange(n) for n in lengths]) if batch else np.zeros(0, np.int64)
        tok_parts.append((gb, prompt_real[gb] + gj, gen[gb, gj], GENERATED))

    tokens = _tokens_table(group, tok_parts, seq_ids, token_texts)
    routes = _routes_table(route_parts, seq_ids, end, rec)
    hidden = _hidden_table(hidden_parts, seq_ids, end)
    sequences = _sequences_table(group, seq_ids, rec, prompt_real)
    return {"sequences": sequences, "tokens": tokens, "routes": routes, "hidden": hidden}


def decoded_prompts(group: Group, tokenizer: Any) -> tuple[list[str] | None, list[list[tuple[int, int]]] | None]:
    """(texts, char spans) of a group's prompts recovered from their token ids: each text is
    the decoded prompt (special tokens skipped), and the spans of its real tokens are those
    of re-tokenizing it, kept only where that gives back exactly the recorded ids (special
    tokens get (0, 0), as the tokenizer reports them). A row whose ids do not round-trip,
    or a slow tokenizer, gets no spans (char_start / char_end stay -1)."""
    first = next((s for s in group.steps if s.phase == PROMPT and s.token_ids is not None), None)
    if first is None:
        return None, None
    ids, mask = first.token_ids.numpy(), first.mask.numpy().astype(bool)
    ids, mask = ids[:, first.first_new_col:], mask[:, first.first_new_col:]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts: list[str] = []
    offsets: list[list[tuple[int, int]]] = []
    for row in range(group.batch):
        real = [int(i) for i in ids[row][mask[row]]]
        text = tokenizer.decode(real, skip_special_tokens=True)
        texts.append(text)
        offsets.append(_round_trip_spans(tokenizer, text, real, special))
    return texts, offsets


def _round_trip_spans(tokenizer: Any, text: str, ids: list[int], special: set[int]) -> list[tuple[int, int]]:
    if not getattr(tokenizer, "is_fast", False):
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if enc["input_ids"] != [i for i in ids if i not in special]:
        return []  # decoding is not invertible here: no spans rather than wrong ones
    spans = iter(enc["offset_mapping"])
    return [(0, 0) if i in special else tuple(next(spans)) for i in ids]


def _route_block(lrec: Any, flat: np.ndarray, rows_b: np.ndarray, pos: np.ndarray, layer: int) -> dict[str, np.ndarray]:
    ids = _np(lrec.ids)[flat]
    block: dict[str, np.ndarray] = {"b": rows_b, "pos": pos, "layer": np.full(len(flat), layer, np.uint16)}
    if lrec.weights is not None:
        w = _np(lrec.weights)[flat]
        order = np.argsort(-w.astype(np.float32), axis=1, kind="stable")
        block["weights"] = np.take_along_axis(w, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
        if lrec.dropped is not None:
            block["dropped"] = np.take_along_axis(_np(lrec.dropped)[flat], order, axis=1)
    block["experts"] = ids
    if lrec.scores is not None:
        block["scores"] = _np(lrec.scores)[flat]
    return block


def _tokens_table(group: Group, parts: list, seq_ids: np.ndarray, token_texts: TokenTexts) -> pa.Table:
    if parts:
        b = np.concatenate([p[0] for p in parts]).astype(np.int64)
        pos = np.concatenate([p[1] for p in parts]).astype(np.int64)
        tok = np.concatenate([p[2] for p in parts]).astype(np.int64)
        phase = np.concatenate([np.full(len(p[0]), p[3], dtype=object) for p in parts])
    else:
        b = pos = tok = np.zeros(0, np.int64)
        phase = np.zeros(0, dtype=object)
    order = np.lexsort((pos, seq_ids[b]))
    b, pos, tok, phase = b[order], pos[order], tok[order], phase[order]
    start = np.full(len(b), -1, np.int32)
    end = np.full(len(b), -1, np.int32)
    if group.offsets is not None:
        for row, spans in enumerate(group.offsets):
            sel = np.nonzero((b == row) & (phase == PROMPT))[0]
            sel = sel[pos[sel] < len(spans)]
            if len(sel):
                arr = np.asarray(spans, dtype=np.int64)[pos[sel]]
                start[sel], end[sel] = arr[:, 0], arr[:, 1]
    return pa.table(
        {
            "seq_id": pa.array(seq_ids[b], pa.uint32()),
            "pos": pa.array(pos, pa.uint32()),
            "token_id": pa.array(tok, pa.uint32()),
            "phase": pa.array(phase.tolist(), pa.string()),
            "token": pa.array(token_texts(tok), pa.string()),
            "char_start": pa.array(start, pa.int32()),
            "char_end": pa.array(end, pa.int32()),
        },
        schema=tokens_schema(),
    )


def _routes_table(parts: list[dict[str, np.ndarray]], seq_ids: np.ndarray, end: np.ndarray, rec: "Recorder") -> pa.Table:
    n_experts = max(layer.n_experts for layer in rec.layers)
    opts = rec.options
    has_dropped = any("dropped" in p for p in parts)
    schema = routes_schema(n_experts, opts.weights_dtype, dropped=has_dropped, router_scores=opts.router_scores)
    if not parts:
        return schema.empty_table()
    cat = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    b, pos, layer = cat("b"), cat("pos"), cat("layer")
    keep = pos < end[b]
    order = np.lexsort((layer[keep], pos[keep], seq_ids[b[keep]]))
    sel = np.nonzero(keep)[0][order]
    b, pos, layer = b[sel], pos[sel], layer[sel]
    columns: dict[str, Any] = {
        "seq_id": pa.array(seq_ids[b], pa.uint32()),
        "pos": pa.array(pos, pa.uint32()),
        "layer": pa.array(layer, pa.uint16()),
        "experts": _list_array(cat("experts")[sel], expert_id_type(n_experts)),
    }
    if all("weights" in p for p in parts):
        columns["weights"] = _list_array(cat("weights")[sel], float_type(opts.weights_dtype))
    else:
        columns["weights"] = pa.nulls(len(sel), pa.list_(float_type(opts.weights_dtype)))
    if has_dropped:
        columns["dropped"] = _list_array(cat("dropped")[sel].astype(bool), pa.bool_())
    if opts.router_scores is not None:
        name = "router_logits" if opts.router_scores == "logits" else "router_probs"
        columns[name] = _list_array(cat("scores")[sel], pa.float16())
    return pa.table(columns, schema=schema)


def _hidden_table(parts: list, seq_ids: np.ndarray, end: np.ndarray) -> pa.Table | None:
    if not parts:
        return None
    b = np.concatenate([p[0] for p in parts])
    pos = np.concatenate([p[1] for p in parts])
    layer = np.concatenate([np.full(len(p[0]), p[2], np.uint16) for p in parts])
    vec = np.concatenate([p[3] for p in parts]).astype(np.float16)
    keep = pos < end[b]
    order = np.lexsort((layer[keep], pos[keep], seq_ids[b[keep]]))
    sel = np.nonzero(keep)[0][order]
    return pa.table(
        {
            "seq_id": pa.array(seq_ids[b[sel]], pa.uint32()),
            "pos": pa.array(pos[sel], pa.uint32()),
            "layer": pa.array(layer[sel], pa.uint16()),
            "hidden": _list_array(vec[sel], pa.float16()),
        },
        schema=HIDDEN_SCHEMA,
    )


def _sequences_table(group: Group, seq_ids: np.ndarray, rec: "Recorder", prompt_real: np.ndarray) -> pa.Table:
    texts = group.texts
    if texts is None:
        texts = [""] * group.batch
        prompt_ids = [s.token_ids for s in group.steps if s.phase == PROMPT and s.token_ids is not None]
        if rec.tokenizer is not None and prompt_ids:
            first = group.steps[0]
            ids, mask = first.token_ids.numpy(), first.mask.numpy().astype(bool)
            texts = [rec.tokenizer.decode(ids[r][mask[r]], skip_special_tokens=True) for r in range(group.batch)]
    columns: dict[str, Any] = {"seq_id": pa.array(seq_ids, pa.uint32()), "text": pa.array(texts, pa.string())}
    if group.generated is not None and rec.tokenizer is not None:
        gen = group.generated.numpy()
        skip = 1 if rec._encoder_stack is not None else 0
        columns["generated_text"] = pa.array(
            [rec.tokenizer.decode(gen[r, skip: group.generated_lengths[r]], skip_special_tokens=True)
             for r in range(group.batch)],
            pa.string(),
        )
    table = pa.table(columns)
    if group.metadata:
        meta = pa.Table.from_pylist(group.metadata)
        for name in meta.column_names:
            if name not in table.column_names:
                table = table.append_column(name, meta.column(name))
    return table


def assemble_groups(groups: list[Group], rec: "Recorder") -> dict[str, pa.Table | None]:
    """Tables of several groups, concatenated (hidden is None when nothing was sampled)."""
    texts = TokenTexts(rec.tokenizer)
    parts = [assemble_group(g, rec, texts) for g in groups]
    out: dict[str, pa.Table | None] = {}
    for name in ("sequences", "tokens", "routes", "hidden"):
        tables = [p[name] for p in parts if p[name] is not None]
        out[name] = pa.concat_tables(tables, promote_options="default") if tables else None
    return out
