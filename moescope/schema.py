"""The trace format's tables: every column, its Arrow type and its meaning, in one place.

A trace directory (see docs/trace-format.md) holds Parquet shards of these tables. Other
programs may write traces: they must produce the REQUIRED columns with compatible types
(any integer type for ids, any float type for weights); OPTIONAL columns may be absent.

Dtypes follow the information bound: expert ids are uint8 when E <= 256 (uint16 otherwise),
weights float16 by default (float32 on request), positions uint32.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

FORMAT_NAME = "moescope-trace"
FORMAT_VERSION = 1

TABLES = ("sequences", "tokens", "routes", "hidden")
PHASES = ("prompt", "generated")


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    required: bool
    doc: str


def expert_id_type(n_experts: int) -> pa.DataType:
    """The narrowest unsigned type that holds expert ids 0..n_experts-1 (and zero-expert ids)."""
    return pa.uint8() if n_experts <= 256 else pa.uint16()


def float_type(name: str) -> pa.DataType:
    """Arrow float type for 'float16' or 'float32'."""
    return {"float16": pa.float16(), "float32": pa.float32()}[name]


SEQUENCES = (
    Column("seq_id", pa.uint32(), True, "Sequence id, unique in the trace (the record's index in the input for datasets)."),
    Column("text", pa.string(), True, "The input text (the prompt, for generation)."),
    Column("generated_text", pa.string(), False, "Decoded generated continuation (generate mode only)."),
    Column("truncated", pa.bool_(), False, "True when the text was longer than max_length and cut (capture)."),
    # Any further column is a metadata field of the input record (e.g. `label`), kept as is.
)

TOKENS = (
    Column("seq_id", pa.uint32(), True, "Sequence id."),
    Column("pos", pa.uint32(), True, "Position among the sequence's real tokens, from 0; padding never counts."),
    Column("token_id", pa.uint32(), True, "Token id in the model's vocabulary."),
    Column("phase", pa.string(), True, "'prompt' or 'generated' (tokens produced by generate())."),
    Column("token", pa.string(), False, "The token's text as the tokenizer decodes it alone."),
    Column("char_start", pa.int32(), False, "Start offset of the token in `text` (prompt tokens; -1 when unknown)."),
    Column("char_end", pa.int32(), False, "End offset (exclusive) of the token in `text` (-1 when unknown)."),
    Column("upos", pa.string(), False, "Universal POS tag of the word the token belongs to (when tagged)."),
    Column("word", pa.int32(), False, "Index of that word in its sentence (when tagged; -1 for none)."),
)

ROUTES = (
    Column("seq_id", pa.uint32(), True, "Sequence id."),
    Column("pos", pa.uint32(), True, "Token position (as in `tokens`)."),
    Column("layer", pa.uint16(), True, "Layer index in the model (0-based; dense layers have no rows)."),
    Column(
        "experts",
        pa.list_(pa.uint8()),
        True,
        "The k logical expert ids (0..E-1) the token was sent to, ordered by weight, descending.",
    ),
    Column(
        "weights",
        pa.list_(pa.float16()),
        False,
        "The weights the model multiplied each expert's output by, aligned with `experts`. "
        "Absent (or null) when the source did not record them (e.g. serving-engine imports).",
    ),
    Column(
        "dropped",
        pa.list_(pa.bool_()),
        False,
        "Per chosen expert, True when the expert's capacity dropped the token (Switch-style routers).",
    ),
    Column("router_logits", pa.list_(pa.float16()), False, "All E router logits before the score function."),
    Column("router_probs", pa.list_(pa.float16()), False, "All E router probabilities (the family's score function)."),
)

HIDDEN = (
    Column("seq_id", pa.uint32(), True, "Sequence id."),
    Column("pos", pa.uint32(), True, "Token position."),
    Column("layer", pa.uint16(), True, "Layer index of the router this vector entered."),
    Column("hidden", pa.list_(pa.float16()), True, "The router's input vector (hidden size values)."),
)

COLUMNS: dict[str, tuple[Column, ...]] = {
    "sequences": SEQUENCES,
    "tokens": TOKENS,
    "routes": ROUTES,
    "hidden": HIDDEN,
}


def required_columns(table: str) -> list[str]:
    """Names of the columns a shard of `table` must have."""
    return [c.name for c in COLUMNS[table] if c.required]


def routes_schema(
    n_experts: int,
    weights_dtype: str = "float16",
    *,
    dropped: bool = False,
    router_scores: str | None = None,
    scores_dtype: str = "float16",
) -> pa.Schema:
    """Arrow schema of the routes table for a capture with these options."""
    fields = [
        pa.field("seq_id", pa.uint32(), nullable=False),
        pa.field("pos", pa.uint32(), nullable=False),
        pa.field("layer", pa.uint16(), nullable=False),
        pa.field("experts", pa.list_(expert_id_type(n_experts)), nullable=False),
        pa.field("weights", pa.list_(float_type(weights_dtype))),
    ]
    if dropped:
        fields.append(pa.field("dropped", pa.list_(pa.bool_())))
    if router_scores == "logits":
        fields.append(pa.field("router_logits", pa.list_(float_type(scores_dtype))))
    elif router_scores == "probs":
        fields.append(pa.field("router_probs", pa.list_(float_type(scores_dtype))))
    return pa.schema(fields)


def tokens_schema(extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """Arrow schema of the tokens table as moescope writes it (plus `extra` columns)."""
    fields = [
        pa.field("seq_id", pa.uint32(), nullable=False),
        pa.field("pos", pa.uint32(), nullable=False),
        pa.field("token_id", pa.uint32(), nullable=False),
        pa.field("phase", pa.string(), nullable=False),
        pa.field("token", pa.string()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
    ]
    for name, typ in (extra or {}).items():
        fields.append(pa.field(name, typ))
    return pa.schema(fields)


HIDDEN_SCHEMA = pa.schema(
    [
        pa.field("seq_id", pa.uint32(), nullable=False),
        pa.field("pos", pa.uint32(), nullable=False),
        pa.field("layer", pa.uint16(), nullable=False),
        pa.field("hidden", pa.list_(pa.float16()), nullable=False),
    ]
)
