"""`moescope analyze compare A B` (routing overlap of two traces of the same text) and
`moescope analyze chat-template` (the same prompts captured with and without a chat template)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from moescope.commands.analyze_core import ENGINE_HELP

console = Console(stderr=True)
PAIR_ENGINE_HELP = {  # --engine ray for two traces (moescope.analysis.compare_map, agreement_run)
    "engine": "'local' (this process) or 'ray' (the routes read by Ray tasks, one range of sequences each).",
    "num_workers": "Ray: tasks running at once (one CPU each; a task reads one range of sequences).",
    "shards_at_a": "Ray: where workers read trace A's shards, if not at its path (shared mount, s3://, gs://, file://).",
    "shards_at_b": "Ray: the same for trace B.",
}


def _pm(mean: Any, sd: Any) -> str:
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return fmt(mean) if sd is None else f"{fmt(mean)} ± {fmt(sd)}"


def _print(values: dict[str, Any], path: Path) -> None:
    align = values["alignment"]
    traces = values.get("traces") or {}
    for side in ("a", "b"):
        t = traces.get(side) or {}
        console.print(f"{side.upper()}: {t.get('path')} (model {t.get('model')})", highlight=False)
    console.print(f"aligned {align['n_prompt_aligned']:,} prompt and {align['n_generated_aligned']:,} generated tokens "
                  f"({align['mode']} mode; {align['share_prompt_matched_a']:.1%} of A's prompt tokens)")
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    blocks = [("all tokens", values)] + [(name.replace("_", " ") + " tokens", block)
                                         for name, block in (values.get("by_phase") or {}).items()]
    for i, layer in enumerate(values["layers"]):
        console.print(f"layer {layer}:", highlight=False)
        for name, block in blocks:
            get = lambda key: (block.get(key) or [None] * (i + 1))[i]  # noqa: E731
            console.print(f"  {name}: overlap {fmt(get('per_layer_overlap'))} (chance given loads "
                          f"{fmt(get('per_layer_load_chance'))}); matched, cross-fitted "
                          f"{fmt(get('per_layer_overlap_matched_crossfit'))} vs matched chance "
                          f"{_pm(get('per_layer_matched_chance'), get('per_layer_matched_chance_sd'))}, token-id null "
                          f"{_pm(get('per_layer_overlap_matched_token_null'), get('per_layer_overlap_matched_token_null_sd'))}"
                          f" (Holm p {fmt(get('per_layer_overlap_matched_token_null_p_holm'))})", highlight=False)
    for note in align.get("notes") or []:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[green]wrote[/] {path}")


def register(app: typer.Typer, *, analyze_app: typer.Typer, **_: object) -> None:
    @analyze_app.command("compare")
    def compare(
        trace_a: Path = typer.Argument(..., help="First trace."),
        trace_b: Path = typer.Argument(..., help="Second trace, of the same texts (another model, checkpoint or template)."),
        out: Path = typer.Option(..., "--out", help="Directory for results.json and figures/."),
        seed: int = typer.Option(0, "--seed", help="Seed of the cross-fitting halves and shuffles."),
        shuffles: int = typer.Option(20, "--shuffles", help="Shuffles of each chance level (matched chance, token-id null)."),
        token_null_shuffles: Optional[int] = typer.Option(None, "--token-null-shuffles", help="Most token-null shuffles "
                                                          "a layer's sequential p may draw (default: enough for "
                                                          "p <= 0.05 after Holm across the layers)."),
        engine: str = typer.Option("local", "--engine", help=PAIR_ENGINE_HELP["engine"]),
        num_workers: int = typer.Option(1, "--num-workers", help=PAIR_ENGINE_HELP["num_workers"]),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help=ENGINE_HELP["address"]),
        shards_at_a: Optional[str] = typer.Option(None, "--shards-at-a", help=PAIR_ENGINE_HELP["shards_at_a"]),
        shards_at_b: Optional[str] = typer.Option(None, "--shards-at-b", help=PAIR_ENGINE_HELP["shards_at_b"]),
    ) -> None:
        """Per-layer routing overlap of two traces on aligned tokens, next to its chance levels,
        with the best one-to-one matching of experts (Hungarian algorithm)."""
        from moescope.analysis.engine import use_engine
        from moescope.analysis.ray_counts import engine_for_pair
        from moescope.analysis.routing_inputs import compare_traces
        from moescope.store.reader import open_trace

        if shuffles < 1:
            from moescope.errors import MoescopeError

            raise MoescopeError(f"--shuffles must be at least 1, not {shuffles}")
        if token_null_shuffles is not None and token_null_shuffles < 0:
            from moescope.errors import MoescopeError

            raise MoescopeError(f"--token-null-shuffles cannot be negative, not {token_null_shuffles}")
        counting, locations = engine_for_pair(engine, num_workers, ray_address, shards_at_a, shards_at_b)
        a, b = open_trace(trace_a), open_trace(trace_b)
        with use_engine(counting):
            result = compare_traces(a, b, seed=seed, shuffles=shuffles, token_null_max=token_null_shuffles,
                                    locations=locations)
        _print(result.values, result.save(out))

    @analyze_app.command("chat-template")
    def chat_template(
        data: Path = typer.Option(..., "--data", help="Prompts: .txt, .jsonl or .parquet (as for capture)."),
        out: Path = typer.Option(..., "--out", help="Directory: traces/plain, traces/chat, results.json, figures/."),
        model: Optional[str] = typer.Option(None, "--model", help="Local model directory or hub id (default: built-in)."),
        template: Optional[str] = typer.Option(None, "--template", help="Template with a {text} placeholder, e.g. "
                                               "'User: {text}\\nAssistant:' (default: the tokenizer's chat template, "
                                               "else that one)."),
        generate: int = typer.Option(16, "--generate", help="New tokens generated (greedy) after each prompt."),
        batch_size: int = typer.Option(8, "--batch-size"),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Longest prompt in tokens."),
        text_field: str = typer.Option("text", "--text-field"),
        device: str = typer.Option("cpu", "--device"),
        seed: int = typer.Option(0, "--seed"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace traces from a different earlier run."),
        shuffles: int = typer.Option(20, "--shuffles", help="Shuffles of each chance level (matched chance, token-id null)."),
    ) -> None:
        """Capture the same prompts with and without a chat template and compare routing of the
        user text's tokens and of the generated tokens, layer by layer (deep-layer consistency)."""
        import json

        from moescope.analysis.chat_template import render_chat, template_source, unescape_template
        from moescope.analysis.routing_inputs import compare_traces
        from moescope.capture.data import TextDataset
        from moescope.capture.dataset import RunOptions
        from moescope.capture.loading import LoadOptions, load_model
        from moescope.commands.capture import run_with_progress
        from moescope.capture.recorder import CaptureOptions
        from moescope.store.reader import open_trace

        template = unescape_template(template)
        plain = TextDataset(data, text_field=text_field)
        loaded, tokenizer = load_model(model, LoadOptions(device=device))
        source = template_source(tokenizer, template)
        chat_file = out / "data" / "chat.jsonl"
        chat_file.parent.mkdir(parents=True, exist_ok=True)
        with open(chat_file, "w", encoding="utf-8") as f:
            for record in plain:
                f.write(json.dumps({"text": render_chat(record.text, tokenizer, template)}, ensure_ascii=False) + "\n")
        run = RunOptions(batch_size=batch_size, max_length=max_length, generate=generate, seed=seed)
        traces = {}
        for name, dataset in (("plain", plain), ("chat", TextDataset(chat_file))):
            console.print(f"capturing the prompts {'with' if name == 'chat' else 'without'} the chat template ...")
            traces[name] = out / "traces" / name
            run_with_progress(loaded, tokenizer, dataset, traces[name], CaptureOptions(seed=seed), run, model, overwrite)
        params = {"kind": "chat-template", "template_source": source, "generate": generate, "data": str(data),
                  "template": template if template is not None else (None if source == "tokenizer" else
                                                                      render_chat("{text}", None, None))}
        result = compare_traces(open_trace(traces["plain"]), open_trace(traces["chat"]), seed=seed, params=params,
                                shuffles=shuffles)
        _print(result.values, result.save(out))
