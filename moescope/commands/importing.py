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


def register(app: typer.Typer, **_: object) -> None:
    app.add_typer(import_app, name="import")


@import_app.command("vllm")
def import_vllm(
    inputs: List[Path] = typer.Argument(..., help=".jsonl / .npz / .npy files of routed experts, or directories of them."),
    out: Path = OUT,
    model_name: Optional[str] = MODEL_NAME,
    n_experts: Optional[int] = N_EXPERTS,
    moe_layers: Optional[str] = typer.Option(None, "--moe-layers", help="Decoder-layer ids of the MoE layers, e.g. 3-26 (default 0..L-1)."),
    n_layers: Optional[int] = N_LAYERS,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import vLLM's routed experts (--enable-return-routed-experts); see docs/scale.md for the file forms."""
    from moescope.importers.common import import_requests, parse_layers
    from moescope.importers.vllm import VllmSource

    manifest = import_requests(VllmSource(inputs), out, layers=parse_layers(moe_layers), model_name=model_name,
                               n_experts=n_experts, n_layers=n_layers, overwrite=overwrite)
    _summary(out, manifest)


@import_app.command("sglang")
def import_sglang(
    inputs: List[Path] = typer.Argument(..., help="expert_distribution_recorder_*.pt dumps (per_token mode), or their directory."),
    out: Path = OUT,
    model_name: Optional[str] = MODEL_NAME,
    n_experts: Optional[int] = N_EXPERTS,
    moe_layers: Optional[str] = typer.Option(None, "--moe-layers", help="Layers to keep, e.g. 3-60 (default: those where any token was routed)."),
    n_layers: Optional[int] = N_LAYERS,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import SGLang expert-distribution dumps recorded in per_token mode."""
    from moescope.importers.common import import_requests, parse_layers
    from moescope.importers.sglang import SglangSource

    manifest = import_requests(SglangSource(inputs), out, slots=parse_layers(moe_layers), used_slots_only=True,
                               model_name=model_name, n_experts=n_experts, n_layers=n_layers, overwrite=overwrite)
    _summary(out, manifest)


def _summary(out: Path, manifest: dict) -> None:
    totals, model = manifest.get("totals", {}), manifest["model"]
    rows = totals.get("rows", {})
    console.print(
        f"[green]trace imported[/]: {out}  ({totals.get('n_sequences', 0):,} sequences, {rows.get('tokens', 0):,} tokens, "
        f"{rows.get('routes', 0):,} token-layer routes; E={model['n_experts']}, k={model['top_k']}, "
        f"{len(model['moe_layers'])} MoE layers; no routing weights)"
    )
