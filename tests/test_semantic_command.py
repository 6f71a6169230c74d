"""`moescope analyze semantic` end to end on the tiny OLMoE: probes -> capture -> alignment -> results."""
from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from moescope.commands import analyze_semantic
from moescope.errors import DataError, MoescopeError


def _run(*args: str):
    app, analyze = typer.Typer(), typer.Typer()
    app.add_typer(analyze, name="analyze")
    analyze_semantic.register(app, analyze_app=analyze)
    return CliRunner().invoke(app, ["analyze", "semantic", *args], standalone_mode=False)


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("semantic")
    result = _run("--model", str(tiny_dir), "--out", str(out), "--pairs", "40", "--items", "8", "--n-boot", "200",
                  "--batch-size", "16")
    assert result.exception is None, result.output
    return out


def test_capture_and_analyse(run_dir):
    body = json.loads((run_dir / "results.json").read_text())
    assert body["analysis"] == "semantic" and body["layers"] == [0, 1, 2]
    assert body["n_experts"] == 8 and body["top_k"] == 2 and body["params"]["subword"] == "first"
    lines = (run_dir / "probes.jsonl").read_text().splitlines()
    assert body["n_contexts"] == len(lines)
    assert body["n_pairs_same"] + body["n_pairs_different"] >= 30  # a few may be cut off by the 64-token context
    assert body["n_items"] >= 6
    for key in ("same_sense_kappa", "different_sense_kappa", "difference_ci_low", "difference_ci_high", "p_value",
                "substitute_kappa", "control_kappa", "substitution_p_value"):
        assert len(body[key]) == 3 and all(v is None or -1 <= v <= 1 for v in body[key]), key
    assert (run_dir / "figures" / "semantic_sense_pairs.png").stat().st_size > 5000
    assert body["probe_sources"] == {"sense_pairs": ["wordnet-3.0"], "substitution": ["wordnet-3.0"]}


def test_existing_trace_gives_the_same_results(run_dir, tmp_path):
    first = json.loads((run_dir / "results.json").read_text())
    for extra in ([], ["--probes", str(run_dir / "probes.jsonl")]):
        out = tmp_path / f"again{len(extra)}"
        result = _run("--trace", str(run_dir / "trace"), "--out", str(out), "--n-boot", "200", *extra)
        assert result.exception is None, result.output
        again = json.loads((out / "results.json").read_text())
        assert {k: v for k, v in again.items() if k != "trace"} == {k: v for k, v in first.items() if k != "trace"}


def test_user_errors_are_one_line(run_dir, tmp_path):
    wrong = tmp_path / "other.jsonl"
    lines = (run_dir / "probes.jsonl").read_text().splitlines()
    wrong.write_text("\n".join(lines[1:]) + "\n")
    result = _run("--trace", str(run_dir / "trace"), "--probes", str(wrong), "--out", str(tmp_path / "x"))
    assert isinstance(result.exception, DataError) and "captured from" in str(result.exception)
    for args in (["--subword", "middle"], ["--trace", str(run_dir / "trace"), "--model", "m"], ["--pairs", "0", "--items", "0"]):
        result = _run("--out", str(tmp_path / "y"), *args)
        assert isinstance(result.exception, MoescopeError) and "\n" not in str(result.exception), args


def test_report_section(run_dir):
    from moescope.report.html import build_report, report_env
    from moescope.report.sections import renderer

    body = json.loads((run_dir / "results.json").read_text())
    assert body["trace"] == "trace"  # relative: the output directory can move
    hostile = {**body, "probe_sources": {"sense_pairs": ["<script>alert(1)</script>"], "substitution": ["a&b"]}}
    section = renderer("semantic")(hostile, run_dir, report_env())
    assert section.key == "semantic" and "<script>alert" not in section.html and "&lt;script&gt;" in section.html
    assert section.html.count("<tr>") == 2 * (len(body["layers"]) + 1) and section.html.count("data:image/png") == 2
    assert "layer" in section.summary and "identical" in section.summary
    no_sub = {k: v for k, v in body.items() if not k.startswith(("substitut", "control"))}
    assert "Substitution" not in renderer("semantic")(no_sub, run_dir, report_env()).html
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing section would fall back to the generic one with a warning
        html = build_report([run_dir])
    assert "Semantic routing" in html


@pytest.mark.slow  # three more captures of the probes (~25 s on 2 cores)
def test_random_init_control_over_three_seeds(run_dir, tiny_dir, tmp_path):
    out = tmp_path / "control"
    result = _run("--trace", str(run_dir / "trace"), "--model", str(tiny_dir), "--random-init-seeds", "0,1,2",
                  "--out", str(out), "--n-boot", "200")
    assert result.exception is None, result.output
    body = json.loads((out / "results.json").read_text())
    assert body["random_init_seeds"] == [0, 1, 2] and body["n_lemmas_trained_vs_random"] >= 5
    for key in ("random_init_difference", "trained_minus_random_difference", "trained_minus_random_difference_ci_low",
                "trained_minus_random_p_value", "trained_minus_random_p_value_holm"):
        assert len(body[key]) == 3, key
    assert len(body["random_init_difference_per_seed"]) == 3
    for seed in (0, 1, 2):
        copy = json.loads((out / "random-init" / f"seed-{seed}" / "results.json").read_text())
        assert copy["n_contexts"] == body["n_contexts"]
        assert (out / "random-init" / f"seed-{seed}" / "model" / "model.safetensors").is_file()
    one = json.loads((out / "random-init" / "seed-0" / "results.json").read_text())
    two = json.loads((out / "random-init" / "seed-1" / "results.json").read_text())
    assert one["same_sense_kappa"] != two["same_sense_kappa"]  # different random weights


def test_random_init_seeds_need_three(run_dir, tmp_path):
    for seeds, message in (("0,1", "at least 3"), ("0,0,1", "at least 3"), ("a,b,c", "integers")):
        bad = _run("--trace", str(run_dir / "trace"), "--random-init-seeds", seeds, "--out", str(tmp_path / "z"))
        assert isinstance(bad.exception, MoescopeError) and message in str(bad.exception), seeds
