"""The keyword style shared by `record` and `capture_dataset`, the choice of MoE layers, and
saving what `record` captured as a trace directory."""
from __future__ import annotations

import os
from dataclasses import asdict, fields, replace
from typing import TYPE_CHECKING, Any

from moescope.errors import MoescopeError

if TYPE_CHECKING:
    from moescope.capture.recorder import Recorder
    from moescope.store.reader import Trace


def merge_options(cls: type, base: Any, kwargs: dict[str, Any], *, strict: bool = True) -> Any:
    """`base` (an instance of the options dataclass `cls`, or None for its defaults) with the
    fields named in `kwargs` replaced (and validated again). With `strict`, TypeError naming
    the accepted keywords for a keyword `cls` does not have; otherwise those are ignored."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown and strict:
        raise TypeError(f"unexpected keyword(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
    mine = {k: v for k, v in kwargs.items() if k in names}
    base = base if base is not None else cls()
    return replace(base, **mine) if mine else base


def check_layers(moe_layers: list[int], wanted: tuple[int, ...] | None) -> list[int]:
    """The MoE layers to record, in model order: all of `moe_layers` when `wanted` is None.
    MoescopeError in one line, listing the model's MoE layers, when a wanted layer is not one
    (a dense layer, or out of range) or none is wanted."""
    if wanted is None:
        return list(moe_layers)
    bad = [x for x in wanted if x not in moe_layers]
    if bad or not wanted:
        raise MoescopeError(
            f"layer(s) {', '.join(map(str, bad)) or '(none)'} are not MoE layers of this model; "
            f"its MoE layers are {', '.join(map(str, moe_layers))}"
        )
    return [x for x in moe_layers if x in set(wanted)]


def save_recording(rec: "Recorder", out: str | os.PathLike, *, model_name: str | None = None,
                   overwrite: bool = False) -> "Trace":
    """Write the tables `rec` recorded as a trace directory (through the store's writer, with a
    manifest describing the model as a capture does; capture mode "record", the layers
    recorded, the tokenizer). Returns the opened trace."""
    from moescope.capture.loading import describe_model
    from moescope.store.reader import open_trace
    from moescope.store.tables import write_trace

    tables = rec.tables()
    if tables["routes"] is None or not tables["routes"].num_rows:
        raise MoescopeError("nothing was recorded yet: run the model inside `with moescope.record(...)` first")
    name = model_name or getattr(rec.model, "name_or_path", None) or rec.model.config._name_or_path
    options = {f"option_{k}": v for k, v in asdict(rec.options).items()}
    capture = {"mode": "record", "has_weights": True, "layers": [layer.layer for layer in rec.layers], **options}
    extra: dict[str, Any] = {}
    if rec.tokenizer is not None:
        extra["tokenizer"] = {"name_or_path": getattr(rec.tokenizer, "name_or_path", name),
                              "vocab_size": len(rec.tokenizer),
                              "padding_side": getattr(rec.tokenizer, "padding_side", None)}
    write_trace(out, sequences=tables["sequences"], tokens=tables["tokens"], routes=tables["routes"],
                hidden=tables["hidden"], model=describe_model(rec.model, str(name)), capture=capture,
                header_extra=extra, overwrite=overwrite)
    return open_trace(out, verify=False)  # write_trace hashed each shard as it wrote it: no second read
