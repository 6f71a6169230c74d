"""`moescope analyze stats` and `moescope analyze signatures`: the core routing analyses."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
PHASES = ("prompt", "generated", "all")
ENGINE_HELP = {  # --engine ray: the counting pass on Ray (moescope.analysis.ray_counts)
    "engine": "'local' (this process) or 'ray' (the counting pass as Ray tasks, one per shard).",
    "num_workers": "Ray: shards counted at once (one CPU each).",
    "address": "Ray: cluster address (default: the running cluster, else a local one).",
    "shards_at": "Ray: where workers read the trace's shards, if not at its path (shared mount, s3://, gs://, file://).",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value)


def _pm(mean: Any, sd: Any) -> str:
    return _fmt(mean) if sd is None else f"{_fmt(mean)} ± {_fmt(sd)}"


def _check_phase(phase: str) -> None:
    from moescope.errors import MoescopeError

    if phase not in PHASES:
        raise MoescopeError(f"--phase {phase!r} is not one of {', '.join(PHASES)}")


def _notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def stats_table(v: dict[str, Any]) -> Table:
    """Per MoE layer: the load, co-activation, token and label numbers next to their chance levels."""
    table = Table(title=f"Routing statistics (E={v['n_experts']}, k={v['top_k']}, phase {v['phase']})")
    for col in ("layer", "entropy / max (bits)", "KL from uniform (chance)", "dead", "rare",
                "co-activation dispersion (chance)", "token purity (chance)", "label MI bits (95% shuffles)"):
        table.add_column(col, justify="right")
    load, co, tok, lab = v["load"], v.get("coactivation"), v.get("token_specialisation"), v.get("label_specialisation")
    for i, layer in enumerate(v["moe_layers"]):
        c = co["per_layer"][i] if co else None
        table.add_row(
            str(layer), f"{_fmt(load['entropy_bits'][i])} / {_fmt(load['entropy_max_bits'], 2)}",
            f"{_fmt(load['kl_uniform_bits'][i], 4)} ({_fmt(load['kl_uniform_chance_bits'][i], 4)})",
            str(load["n_dead"][i]), str(load["n_rare"][i]),
            f"{_fmt(c['dispersion'], 2)} ({_fmt(c['dispersion_chance'], 2)} ± {_fmt(c.get('dispersion_chance_sd'), 2)})"
            if c else "n/a",
            f"{_fmt(tok['token_purity'][i])} ({_fmt(tok['token_purity_chance'][i])})" if tok else "n/a",
            f"{_fmt(lab['mi_bits'][i], 4)} ({_fmt(lab['mi_permutation_p95_bits'][i], 4)})"
            if lab and lab.get("mi_permutation_p95_bits") is not None else "n/a")
    return table


def _ci(v: dict[str, Any], prefix: str) -> str:
    lo, hi = v.get(f"{prefix}_ci_low"), v.get(f"{prefix}_ci_high")
    mean = v.get(f"{prefix}_mean", v.get(prefix))
    return _fmt(mean) if lo is None or hi is None else f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]"


def _adds(v: dict[str, Any], name: str) -> str:
    if v.get(name) is None:
        return "n/a"
    lo, hi = v.get(f"{name}_ci_low"), v.get(f"{name}_ci_high")
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
    return f"signature adds {v[name]:+.3f}{ci}, p = {_fmt(v.get(f'{name}_p_value'), 3)}"


def signatures_table(v: dict[str, Any]) -> Table:
    """The headline numbers of a signatures result, each next to its baseline."""
    grouped = f", grouped by {v['group_field']!r} ({v.get('n_groups')} groups)" if v.get("group_field") else ""
    table = Table(title=f"Routing signatures by {v['label']!r}: {v['n_sequences']} sequences, "
                        f"{len(v['labels'])} labels, {v.get('cv_repeats', 1)}x{v['folds']}-fold CV{grouped}, "
                        f"{v['phase']} tokens")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("baseline", justify="right")
    table.add_row("cosine within labels", _pm(v["within_cosine_mean"], v["within_cosine_sd"]),
                  f"across: {_pm(v['across_cosine_mean'], v['across_cosine_sd'])}")
    table.add_row("Cohen's d (within vs across)", _fmt(v["cohens_d"]),
                  f"load-balanced control: {_fmt(v['load_balanced_cohens_d'])}")
    table.add_row("CV accuracy [95% CI]", _ci(v, "cv_accuracy"),
                  f"chance {_fmt(v['chance_accuracy'])} (majority; uniform {_fmt(v.get('uniform_chance_accuracy'))})")
    table.add_row("macro-F1", _fmt(v["macro_f1"]), "")
    if v.get("permutation_accuracy_mean") is not None:
        table.add_row("label permutation", _pm(v["permutation_accuracy_mean"], v["permutation_accuracy_sd"]),
                      f"{v.get('permutation_p_value_text') or _fmt(v['permutation_p_value'], 4)} "
                      f"({len(v['permutation_accuracies'])} shuffles)")
    if v.get("load_balanced_accuracy_mean") is not None:
        table.add_row("load-balancing control", _pm(v["load_balanced_accuracy_mean"], v["load_balanced_accuracy_sd"]),
                      "loads kept, assignments re-drawn")
    if v.get("bag_of_tokens_accuracy_mean") is not None:
        table.add_row("bag of token ids", _ci(v, "bag_of_tokens_accuracy"), _adds(v, "adds_over_bag_of_tokens"))
        table.add_row("token-id routing control", _ci(v, "token_id_control_accuracy"),
                      _adds(v, "adds_over_token_id_control"))
    best = v["per_layer_accuracy"][v["moe_layers"].index(v["best_layer"])]
    stability = v.get("best_layer_stability")
    table.add_row("best single layer", f"layer {v['best_layer']}: {_fmt(best)}"
                  + (f" (best in {100 * stability:.0f}% of repeats)" if stability is not None else ""),
                  "per layer: " + " ".join(_fmt(a, 2) for a in v["per_layer_accuracy"]))
    if v.get("per_layer_p_value_holm") is not None:
        table.add_row("per-layer p (Holm)", "", " ".join(_fmt(p, 2) for p in v["per_layer_p_value_holm"]))
    table.add_row("first n tokens", " ".join(f"{n}:{_fmt(a, 2)}" for n, a in zip(v["first_n_tokens"], v["first_n_accuracy"])),
                  "accuracy by tokens seen")
    return table


def register(app: typer.Typer, *, analyze_app: typer.Typer, **_: object) -> None:
    def _jobs(jobs: int) -> int:
        """--jobs: 0 means one thread per available core (at most 8)."""
        from moescope.errors import MoescopeError

        if jobs < 0:
            raise MoescopeError(f"--jobs must be at least 0 (0: one per core), not {jobs}")
        from moescope.inference import default_jobs

        return jobs or default_jobs()

    @analyze_app.command("stats")
    def stats(
        trace_dir: Path = typer.Argument(..., help="A trace directory."),
        out: Path = typer.Option(..., "--out", help="Directory for results.json and figures/."),
        label: Optional[str] = typer.Option(None, "--label", help="Sequences field for label specialisation (e.g. label)."),
        phase: str = typer.Option("all", "--phase", help="Tokens analysed: all, prompt or generated."),
        focus_layer: Optional[int] = typer.Option(None, "--focus-layer", help="Layer of the co-activation, transition "
                                                  "and weight figures (default: the middle MoE layer)."),
        top_tokens: int = typer.Option(10, "--top-tokens", help="Tokens listed per expert (token specialisation)."),
        min_token_count: int = typer.Option(20, "--min-token-count", help="Only tokens seen this often are listed."),
        permutations: Optional[int] = typer.Option(None, "--permutations", help="Label shuffles for the label-"
                                                   "specialisation baseline (default: enough for p <= 0.01 after Holm "
                                                   "across the layers, at least 100)."),
        seed: int = typer.Option(0, "--seed"),
        chance_replicates: int = typer.Option(20, "--chance-replicates", help="Simulated routers per layer for the "
                                              "co-activation chance (mean ± SD); fewer on very large models."),
        jobs: int = typer.Option(0, "--jobs", help="Threads over the layers' co-activation chance (0: one per "
                                 "available core, at most 8). Results do not depend on it."),
        engine: str = typer.Option("local", "--engine", help=ENGINE_HELP["engine"]),
        num_workers: int = typer.Option(1, "--num-workers", help=ENGINE_HELP["num_workers"]),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help=ENGINE_HELP["address"]),
        shards_at: Optional[str] = typer.Option(None, "--shards-at", help=ENGINE_HELP["shards_at"]),
    ) -> None:
        """Expert load, entropy and KL from uniform, dead/rare experts, co-activation of every pair,
        layer-to-layer transitions, token and label specialisation, weights, prompt vs generated."""
        from moescope.analysis.engine import use_engine
        from moescope.analysis.ray_counts import engine_for
        from moescope.analysis.stats import routing_statistics
        from moescope.store.reader import open_trace

        _check_phase(phase)
        counting = engine_for(engine, num_workers, ray_address, shards_at)
        trace = open_trace(trace_dir)
        with use_engine(counting):
            result = routing_statistics(trace, label=label, phase=phase, focus_layer=focus_layer, top_tokens=top_tokens,
                                        min_token_count=min_token_count, permutations=permutations, seed=seed,
                                        chance_replicates=chance_replicates, n_jobs=_jobs(jobs))
        path = result.save(out)
        console.print(stats_table(result.values))
        console.print(f"router: {result.values.get('router')}", highlight=False)
        _notes(result.values["notes"])
        console.print(f"[green]wrote[/] {path}")

    @analyze_app.command("signatures")
    def signatures(
        trace_dir: Path = typer.Argument(..., help="A trace whose sequences carry a label field."),
        label: str = typer.Option(..., "--label", help="The sequences field holding each sequence's label."),
        out: Path = typer.Option(..., "--out", help="Directory for results.json and figures/."),
        group: Optional[str] = typer.Option(None, "--group", help="Sequences field grouping sequences that must stay on "
                                            "one side of every split (e.g. a document id). Default: doc_id when the "
                                            "trace has it; 'none' for no grouping."),
        folds: int = typer.Option(5, "--folds", help="Stratified (grouped) cross-validation folds."),
        repeats: int = typer.Option(5, "--repeats", help="Cross-validation repeats, each with its own shuffle."),
        permutations: int = typer.Option(200, "--permutations", help="Label shuffles of the permutation baseline."),
        layer_permutations: Optional[int] = typer.Option(None, "--layer-permutations", help="Most label shuffles one "
                                                         "layer's sequential test may draw (default: enough for "
                                                         "p <= 0.01 after Holm across the layers)."),
        seed: int = typer.Option(0, "--seed"),
        phase: str = typer.Option("prompt", "--phase", help="Tokens in the signature: prompt, generated or all."),
        control_draws: int = typer.Option(3, "--control-draws", help="Re-draws of the load-balancing control."),
        jobs: int = typer.Option(0, "--jobs", help="Threads over the cross-validation folds (0: one per "
                                 "available core, at most 8). Results do not depend on it."),
        max_sequences: Optional[int] = typer.Option(None, "--max-sequences", help="Analyse a sample of about N "
                                                    "labelled sequences (stratified by label, whole groups, seeded)."),
        engine: str = typer.Option("local", "--engine", help=ENGINE_HELP["engine"]),
        num_workers: int = typer.Option(1, "--num-workers", help=ENGINE_HELP["num_workers"]),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help=ENGINE_HELP["address"]),
        shards_at: Optional[str] = typer.Option(None, "--shards-at", help=ENGINE_HELP["shards_at"]),
    ) -> None:
        """Per-sequence routing signatures: do they separate the labels, and by more than chance,
        load balance and token identity?"""
        from moescope.analysis.engine import use_engine
        from moescope.analysis.ray_counts import engine_for
        from moescope.analysis.signatures import routing_signatures
        from moescope.errors import MoescopeError
        from moescope.store.reader import open_trace

        _check_phase(phase)
        if folds < 2:
            raise MoescopeError(f"--folds must be at least 2, not {folds}")
        if permutations < 0 or control_draws < 0 or (layer_permutations or 0) < 0:
            raise MoescopeError("--permutations, --layer-permutations and --control-draws cannot be negative")
        if repeats < 1:
            raise MoescopeError("--repeats must be at least 1")
        counting = engine_for(engine, num_workers, ray_address, shards_at)
        trace = open_trace(trace_dir)
        with use_engine(counting):
            result = routing_signatures(trace, label=label, group=group, folds=folds, repeats=repeats,
                                        permutations=permutations, seed=seed, phase=phase,
                                        control_draws=control_draws, n_jobs=_jobs(jobs), max_sequences=max_sequences,
                                        layer_permutations=layer_permutations)
        path = result.save(out)
        console.print(signatures_table(result.values))
        _notes(result.values["notes"])
        console.print(f"[green]wrote[/] {path}")
