"""`moescope import vllm|sglang INPUT... --out TRACE`: serving-engine routing logs as traces."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

console = Console(stderr=True)

import_app = typer.Typer(help="Import routing logged by serving engines (vLLM, SGLang) as a trace.",
                         no_args_is_help=True)

MODEL_NAME = typer.Option(None, "--model-name", help="The served model's name or path, recorded in the manifest.")
N_EXPERTS = typer.Option(None, "--n-experts", help="Routed experts per layer, E (default: largest id + 1, with a warning).")
N_LAYERS = typer.Option(None, "--n-layers", help="Decoder layers of the model (default: last MoE layer + 1).")
OUT = typer.Option(..., "--out", help="Trace directory to write.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace a different trace already at --out.")
MODEL = typer.Option(None, "--model", help="The served model (local directory or hub id; only its config and "
                     "tokenizer are read): layers, MoE layers, k, E and token texts. Needed for engine responses.")
REVISION = typer.Option(None, "--revision", help="Hub revision of --model.")
TRUST = typer.Option(False, "--trust-remote-code", help="Run --model's own config code (only if you trust it).")


def _engine_model(model: str | None, revision: str | None, trust_remote_code: bool):  # noqa: ANN202
    if model is None:
        return None
    from moescope.importers.engine_model import describe_engine_model

    return describe_engine_model(model, revision=revision, trust_remote_code=trust_remote_code)


def register(app: typer.Typer, **_: object) -> None:
    app.add_typer(import_app, name="import")


@import_app.command("vllm")
def import_vllm(
    inputs: List[Path] = typer.Argument(..., help="JSONL of vLLM responses as returned (or .npz / .npy routed experts), or directories of them."),
    out: Path = OUT,
    model: Optional[str] = MODEL,
    model_name: Optional[str] = MODEL_NAME,
    n_experts: Optional[int] = N_EXPERTS,
    moe_layers: Optional[str] = typer.Option(None, "--moe-layers", help="Without --model: decoder-layer ids of the MoE layers, e.g. 3-26 (default 0..L-1)."),
    n_layers: Optional[int] = N_LAYERS,
    revision: Optional[str] = REVISION,
    trust_remote_code: bool = TRUST,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import vLLM's routed experts (--enable-return-routed-experts); see docs/scale.md (serving engines)."""
    from moescope.errors import MoescopeError
    from moescope.importers.common import import_requests, parse_layers
    from moescope.importers.vllm import VllmSource

    if model is not None and (moe_layers or n_experts or n_layers):
        raise MoescopeError("--model gives the MoE layers, E and the layer count; drop --moe-layers / --n-experts / --n-layers")
    engine_model = _engine_model(model, revision, trust_remote_code)
    manifest = import_requests(VllmSource(inputs, engine_model), out, layers=parse_layers(moe_layers),
                               model_name=model_name, n_experts=n_experts, n_layers=n_layers, overwrite=overwrite,
                               model=engine_model)
    _summary(out, manifest)


@import_app.command("sglang")
def import_sglang(
    inputs: List[Path] = typer.Argument(..., help="JSONL of SGLang responses as returned (/generate or OpenAI), or expert_distribution_recorder_*.pt dumps (per_token mode), or their directory."),
    out: Path = OUT,
    model: Optional[str] = MODEL,
    model_name: Optional[str] = MODEL_NAME,
    n_experts: Optional[int] = N_EXPERTS,
    moe_layers: Optional[str] = typer.Option(None, "--moe-layers", help="Dumps without --model: layers to keep, e.g. 3-60 (default: those where any token was routed)."),
    n_layers: Optional[int] = N_LAYERS,
    revision: Optional[str] = REVISION,
    trust_remote_code: bool = TRUST,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import SGLang's routed experts (--enable-return-routed-experts) or its per_token recorder dumps."""
    from moescope.errors import MoescopeError
    from moescope.importers.common import import_requests, parse_layers
    from moescope.importers.sglang import SglangSource

    if model is not None and (moe_layers or n_experts or n_layers):
        raise MoescopeError("--model gives the MoE layers, E and the layer count; drop --moe-layers / --n-experts / --n-layers")
    engine_model = _engine_model(model, revision, trust_remote_code)
    source = SglangSource(inputs, engine_model)
    if engine_model is None:
        manifest = import_requests(source, out, slots=parse_layers(moe_layers), used_slots_only=True,
                                   model_name=model_name, n_experts=n_experts, n_layers=n_layers, overwrite=overwrite)
    else:  # responses are already cut to the MoE layers; a dump's layer axis is every decoder layer
        slots = None if source.responses else list(engine_model.moe_layers)
        manifest = import_requests(source, out, slots=slots, model_name=model_name, overwrite=overwrite,
                                   model=engine_model)
    _summary(out, manifest)


def _summary(out: Path, manifest: dict) -> None:
    totals, model = manifest.get("totals", {}), manifest["model"]
    rows = totals.get("rows", {})
    console.print(
        f"[green]trace imported[/]: {out}  ({totals.get('n_sequences', 0):,} sequences, {rows.get('tokens', 0):,} tokens, "
        f"{rows.get('routes', 0):,} token-layer routes; E={model['n_experts']}, k={model['top_k']}, "
        f"{len(model['moe_layers'])} MoE layers; no routing weights)"
    )
