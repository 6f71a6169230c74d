"""The demo: the whole flow on the built-in model and prompts, in a few minutes on a CPU.

1. capture the routing of the built-in task prompts (code, math, story, factual), with a
   short greedy continuation so prompt and generated routing both show;
2. capture the harder prompt set whose categories share their vocabulary;
3. routing statistics of the task prompts;
4. routing signatures of both sets, each next to its baselines;
5. one HTML report of all of it, with the per-token viewer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts"


@dataclass
class DemoResult:
    out: Path
    report: Path
    seconds: dict[str, float] = field(default_factory=dict)
    signatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str = ""


def run_demo(
    out: str | Path,
    *,
    model: str | None = None,
    generate: int = 24,
    batch_size: int = 16,
    permutations: int = 200,
    device: str = "cpu",
    on_stage: Callable[[str], None] = lambda stage: None,
) -> DemoResult:
    """Run the demo into `out`; returns where the report is and the headline numbers.

    Rerunning reuses finished captures (traces are resumable), so only the analyses rerun.
    """
    from moescope.analysis.signatures import routing_signatures
    from moescope.analysis.stats import routing_statistics
    from moescope.capture.dataset import RunOptions, capture_dataset
    from moescope.capture.loading import LoadOptions, load_model
    from moescope.inference import default_jobs
    from moescope.report.html import write_report
    from moescope.store.reader import open_trace

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out=out, report=out / "report.html")
    clock = time.perf_counter

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        on_stage(name)
        started = clock()
        value = fn()
        result.seconds[name] = clock() - started
        return value

    loaded, tokenizer = stage("load the model", lambda: load_model(model, LoadOptions(device=device)))
    result.model = str(loaded.name_or_path)
    sets = {"tasks": (PROMPTS / "tasks.jsonl", generate), "shared-vocabulary": (PROMPTS / "shared_vocab.jsonl", 0)}
    for name, (data, new_tokens) in sets.items():
        run = RunOptions(batch_size=batch_size, generate=new_tokens)
        what = f"capture {data.name}" + (f" + {new_tokens} generated tokens" if new_tokens else "")
        stage(what, lambda data=data, run=run, name=name: capture_dataset(
            loaded, tokenizer, data, out / f"trace-{name}", run=run, model_name=result.model))

    tasks = open_trace(out / "trace-tasks")
    stage("routing statistics", lambda: routing_statistics(tasks, label="label", n_jobs=default_jobs())
                                           .save(out / "stats-tasks"))
    for name in sets:
        trace = open_trace(out / f"trace-{name}")
        sig = stage(f"routing signatures ({name})",
                    lambda trace=trace: routing_signatures(trace, label="label", permutations=permutations,
                                                                   n_jobs=default_jobs()))
        sig.save(out / f"signatures-{name}")
        result.signatures[name] = sig.values
    stage("report", lambda: write_report([out], result.report))
    return result
