"""`moescope verify`: prove, on the user's own model, that what moescope records is what it computes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from moescope.commands._model_options import ALLOW_PICKLE, DEVICE, DTYPE, MODEL, REVISION, TRUST_REMOTE_CODE


def register(app: typer.Typer, **_: object) -> None:
    @app.command("verify")
    def verify(
        model: Optional[str] = MODEL,
        tokens: int = typer.Option(256, "--tokens", help="Real tokens of built-in text to run (in one padded batch)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the per-layer result as JSON to this file."),
        device: str = DEVICE,
        dtype: str = DTYPE,
        revision: Optional[str] = REVISION,
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        allow_pickle: bool = ALLOW_PICKLE,
    ) -> None:
        """Check, layer by layer, that the recorded experts and weights are what the model used.

        Every routed expert is made to output a known vector; the MoE block's output then shows
        which experts reached each token and with what weight; that must equal what moescope
        records. Exits 0 only when every MoE layer passes. The model is restored afterwards.
        """
        from moescope.capture.loading import LoadOptions, load_model
        from moescope.verify import prove, text_inputs

        console = Console()
        console.print(f"loading {model or 'the built-in default model'} ...")
        load = LoadOptions(device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle)
        loaded, tokenizer = load_model(model, load)
        inputs = text_inputs(loaded, tokenizer, tokens)
        proof = prove(loaded, inputs)
        table = Table(title=f"{proof.family} ({proof.model_type}, {proof.dtype}): read-back of every MoE layer")
        for col in ("layer", "experts reached", "ids match", "max weight err", "tolerance", "read at", "verdict"):
            table.add_column(col, justify="right" if col != "verdict" else "left")
        for layer in proof.layers:
            verdict = "[green]pass[/]" if layer.passed else f"[red]FAIL[/] {layer.reason}"
            table.add_row(str(layer.layer), f"{layer.experts_reached}/{layer.n_experts}", f"{layer.experts_match:.1%}", f"{layer.max_weight_error:.2g}",
                          f"{layer.tolerance:.2g}", layer.decoded_at, verdict)
        console.print(table)
        failed = [layer.layer for layer in proof.layers if not layer.passed]
        n_tokens = int(inputs["attention_mask"].sum())
        if out is not None:
            payload = {**proof.to_dict(), "model": model or "built-in default model", "tokens": n_tokens}
            from moescope.store.manifest import atomic_write_bytes

            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
        if proof.passed:
            console.print(f"[bold green]verified[/]: at all {len(proof.layers)} MoE layers, on {n_tokens} tokens, the "
                          "recorded experts and weights are the ones the model's output was made of.")
            unreached = sum(layer.n_experts - layer.experts_reached for layer in proof.layers)
            if unreached:
                # An expert no token reached is unchecked: say so, so "verified" is not read as more than it is.
                console.print(f"note: {unreached} expert(s) across the layers were reached by no token and are unchecked; "
                              "raise --tokens until every layer shows E/E.")
            return
        console.print(f"[bold red]not verified[/]: {len(failed)} of {len(proof.layers)} MoE layers differ "
                      f"(layers {', '.join(map(str, failed))}); do not trust captures of this model until this is fixed.")
        raise typer.Exit(code=1)
