"""`moescope analyze pos` end to end on the tiny OLMoE: CoNLL-U -> tagged trace -> results; --trace; errors."""
from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from moescope.commands import analyze_pos
from moescope.errors import DataError, MoescopeError
from moescope.store.reader import open_trace

SENTENCES = [
    ("The quick brown fox jumps over the lazy dog .", "DET ADJ ADJ NOUN VERB ADP DET ADJ NOUN PUNCT"),
    ("A stitch in time saves nine .", "DET NOUN ADP NOUN VERB NUM PUNCT"),
    ("Once upon a time a keeper watched the sea .", "ADV ADP DET NOUN DET NOUN VERB DET NOUN PUNCT"),
    ("The Nile is the longest river in Africa .", "DET PROPN AUX DET ADJ NOUN ADP PROPN PUNCT"),
    ("What is twelve times seven ?", "PRON AUX NUM NOUN NUM PUNCT"),
]
FAST = ["--folds", "2", "--repeats", "1", "--permutations", "99", "--shuffles", "3", "--tsne-points", "30", "--ablation", "1,2"]


def _conllu(path, repeat: int = 4):
    lines = []
    for r in range(repeat):
        for i, (text, tags) in enumerate(SENTENCES):
            words = text.split()
            lines.append(f"# sent_id = s{r}-{i}")
            for j, (w, t) in enumerate(zip(words, tags.split()), start=1):
                last_before_punct = j < len(words) and words[j] in (".", "?")
                lines.append(f"{j}\t{w}\t_\t{t}\t_\t_\t_\t_\t_\t{'SpaceAfter=No' if last_before_punct else '_'}")
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(*args: str):
    app, analyze = typer.Typer(), typer.Typer()
    app.add_typer(analyze, name="analyze")
    analyze_pos.register(app, analyze_app=analyze)
    return CliRunner().invoke(app, ["analyze", "pos", *args], standalone_mode=False)


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pos")
    conllu = _conllu(out.parent / "gold.conllu")
    result = _run("--model", str(tiny_dir), "--conllu", str(conllu), "--out", str(out), *FAST)
    assert result.exception is None, result.output
    return out


def test_capture_tag_and_analyse(run_dir):
    body = json.loads((run_dir / "results.json").read_text())
    assert body["analysis"] == "pos" and body["moe_layers"] == [0, 1, 2] and body["n_experts"] == 8
    assert "gold.conllu" in body["tag_source"] and body["first_subword_only"] is False and body["trace"] == "trace"
    assert body["alignment"]["words"] == 4 * 42 and body["alignment"]["words_with_tokens"] == 4 * 42
    for key in ("probe_accuracy", "word_form_accuracy", "majority_accuracy", "token_null_probe_accuracy"):
        assert 0 <= body[key] <= 1
    assert set(body["ablation"]["drop_first"]) == {"1", "2"}
    assert (run_dir / "figures" / "tsne.png").is_file() and not (run_dir / ".capture").exists()


def test_tagged_trace_is_a_reusable_trace(run_dir):
    trace = open_trace(run_dir / "trace")
    tokens = trace.table("tokens")
    assert {"upos", "word"} <= set(tokens.column_names) and trace.manifest["capture"]["tags"].startswith("CoNLL-U")
    rows = trace.rows("SELECT t.token, t.upos FROM tokens t WHERE t.seq_id = 3 AND t.upos IS NOT NULL ORDER BY pos")
    text = "".join(tok for tok, _ in rows)
    assert text.replace(" ", "") == "TheNileisthelongestriverinAfrica."
    assert {u for _, u in rows} == {"DET", "PROPN", "AUX", "ADJ", "NOUN", "ADP", "PUNCT"}


def test_analyse_an_existing_trace_first_subwords(run_dir, tmp_path):
    result = _run("--trace", str(run_dir / "trace"), "--out", str(tmp_path), "--first-subword-only", "--folds", "2",
                  "--repeats", "1", "--permutations", "99", "--shuffles", "2", "--tsne-points", "0", "--ablation", "1")
    assert result.exception is None, result.output
    body = json.loads((tmp_path / "results.json").read_text())
    full = json.loads((run_dir / "results.json").read_text())
    assert body["first_subword_only"] is True and body["tag_source"] == full["tag_source"]
    assert (tmp_path / body["trace"]).resolve() == (run_dir / "trace").resolve()  # relative to the results dir
    assert body["n_tokens"] == 4 * 42 < full["n_tokens"]  # one token per word


def test_errors_are_one_line(run_dir, tmp_path):
    res = _run("--trace", str(run_dir / "trace"), "--conllu", "x.conllu", "--out", str(tmp_path))
    assert isinstance(res.exception, MoescopeError) and "drop" in str(res.exception)
    res = _run("--trace", str(run_dir / "trace"), "--out", str(tmp_path), "--ablation", "one")
    assert isinstance(res.exception, MoescopeError) and "--ablation" in str(res.exception)
    from moescope.store.tables import write_trace

    trace = open_trace(run_dir / "trace")
    bare = tmp_path / "bare"
    write_trace(bare, routes=trace.table("routes"), tokens=trace.table("tokens").drop_columns(["upos", "word"]),
                model=trace.model)
    res = _run("--trace", str(bare), "--out", str(tmp_path / "o"))
    assert isinstance(res.exception, DataError) and "no upos column" in str(res.exception)
