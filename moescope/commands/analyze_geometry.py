"""`moescope analyze geometry TRACE --out DIR`: routing next to hidden-state geometry (study 5)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)


def register(app: typer.Typer, *, analyze_app: typer.Typer, **_: object) -> None:
    @analyze_app.command("geometry")
    def geometry(
        trace_dir: Path = typer.Argument(..., help="A trace captured with --hidden-rate (and --router-scores probs)."),
        out: Path = typer.Option(..., "--out", help="Directory for results.json and figures/."),
        pairs: int = typer.Option(20_000, "--pairs", help="Token pairs sampled per layer (random, and same token id)."),
        top_p: float = typer.Option(0.8, "--top-p", help="Probability mass of the top-p expert sets (Jaccard)."),
        seed: int = typer.Option(0, "--seed", help="Seed of every sample."),
        max_tokens: int = typer.Option(20_000, "--max-tokens", help="Tokens with hidden states loaded per layer."),
        nn_queries: int = typer.Option(2_000, "--nn-queries", help="Query tokens of the nearest-neighbour predictor."),
        permutations: int = typer.Option(99, "--permutations", help="Relabellings of the Mantel permutation test."),
        random_routers: Optional[int] = typer.Option(None, "--random-routers", help="Random routers of the "
                                                     "mean-direction null (default: enough for p <= 0.01 after Holm "
                                                     "across the layers, at least 99)."),
        model: Optional[str] = typer.Option(None, "--model", help="Model directory to read router weights from "
                                            "(default: the trace's model, if it is a local directory)."),
    ) -> None:
        """Hidden-state cosine vs routing similarity, nearest-neighbour prediction of expert sets,
        the mean hidden direction and the router, and per-sequence visit frequencies; split by
        token identity and by phase."""
        from moescope.analysis.geometry import GeometryParams, analyze_geometry
        from moescope.analysis.routing_inputs import geometry_layers, router_weights_for
        from moescope.errors import MoescopeError
        from moescope.store.reader import open_trace

        if not 0 < top_p <= 1:
            raise MoescopeError(f"--top-p must be in (0, 1], not {top_p}")
        if min(pairs, max_tokens, nn_queries) < 1:
            raise MoescopeError("--pairs, --max-tokens and --nn-queries must be at least 1")
        trace = open_trace(trace_dir)
        params = GeometryParams(pairs=pairs, top_p=top_p, seed=seed, max_tokens=max_tokens, nn_queries=nn_queries,
                                permutations=permutations, random_routers=random_routers)
        weights, note = router_weights_for(trace, model)
        result = analyze_geometry(geometry_layers(trace, params), n_experts=trace.n_experts, top_k=trace.top_k,
                                  router_weights=weights, params=params, trace=str(trace_dir),
                                  notes=[note] if note else None)
        path = result.save(out)
        v = result.values
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        for i, layer in enumerate(v["layers"]):
            console.print(f"layer {layer}: Spearman(cos, overlap) {fmt(v['spearman_cosine_overlap'][i])} "
                          f"(different id {fmt(v['spearman_cosine_overlap_diff_token'][i])}); nearest-neighbour "
                          f"overlap {fmt(v['nn_overlap'][i])} vs random {fmt(v['random_neighbour_overlap'][i])} "
                          f"vs chance {v['expected_overlap_chance']:.3f}")
        for line in v["notes"]:
            console.print(f"[yellow]note:[/] {line}")
        console.print(f"[green]wrote[/] {path}")
