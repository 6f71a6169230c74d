"""The HTML report: structure, escaping, section discovery and order, the viewer's data, the CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moescope.errors import MoescopeError
from moescope.report import html as report_html
from moescope.report.html import build_report, collect_inputs, write_report
from moescope.report.viewer import _luminance, expert_colors, ink_for, json_for_script, viewer_sample
from moescope.store.reader import open_trace
from report_traces import E, HOSTILE, HOSTILE_TEXT, K, LAYERS, WHITESPACE, make_results, make_trace, top1


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory) -> Path:
    return make_trace(tmp_path_factory.mktemp("report") / "trace")


@pytest.fixture(autouse=True)
def no_stats(monkeypatch):
    """Keep the (possibly installed) statistics analysis out of tests that are not about it."""
    monkeypatch.setitem(sys.modules, "moescope.analysis.stats", None)  # makes its import fail


def viewer_json(html: str) -> list[dict]:
    """The parsed data of every viewer in a report."""
    blocks = re.findall(r'<script type="application/json" class="viewer-data">(.*?)</script>', html, re.S)
    return [json.loads(b) for b in blocks]


def headings(html: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", html)


def test_report_structure(trace_dir):
    html = build_report([trace_dir])
    assert html.startswith("<!DOCTYPE html>")
    assert 'http-equiv="Content-Security-Policy"' in html and "default-src 'none'" in html
    # every contents entry points at an element of the page
    for anchor in re.findall(r'<a href="#([^"]+)">', html):
        assert f'id="{anchor}"' in html
    assert headings(html) == ["Model and trace", "Token viewer"]
    assert "synthetic &lt;moe&gt; &amp; co" in html  # the model name, escaped
    assert "E = 8 routed experts per MoE layer, top-k = 2" in html
    assert "2 of 4 layers: 1, 3" in html and "generate, 5 generated tokens per prompt" in html
    assert "shown next to its" in html and "baseline" in html
    assert '<option value="1">1</option>' in html and '<option value="3">3</option>' in html
    [data] = viewer_json(html)
    assert [s["n"] for s in data["seqs"]] == [len(HOSTILE), len(WHITESPACE), 30]
    assert data["layers"] == LAYERS and data["k"] == K and data["hasWeights"]
    assert html == build_report([trace_dir])  # same input, same bytes


def test_json_for_script_round_trips_and_cannot_close_the_element():
    value = {"t": ["</script><!-- <b>&amp;", "\u2028\u2029", "🙂 שלום \u0301"]}
    text = json_for_script(value)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert json.loads(text) == value


def test_hostile_text_is_escaped_in_the_raw_html(trace_dir, tmp_path):
    results = make_results(tmp_path / "weird", "weird", trace=str(trace_dir), label=HOSTILE_TEXT)
    html = build_report([trace_dir, results], title='<script>alert("t")</script>')
    # the only elements that exist are ours: one data block and the viewer script
    assert html.count("<script") == 2 and html.count("</script>") == 2
    assert "<script>alert" not in html and "<img src=x" not in html
    data_block = html.split('class="viewer-data">')[1].split("</script>")[0]
    assert not set("<>&\u2028\u2029") & set(data_block)  # escaped as \\uXXXX inside the JSON
    assert "&lt;script&gt;alert(&#34;t&#34;)&lt;/script&gt;" in html  # the title
    assert "&lt;img src=x onerror=alert(2)&gt;" in html  # the generic section's value
    [data] = viewer_json(html)
    assert data["seqs"][0]["text"] == HOSTILE  # the JSON gives the tokens back exactly
    assert data["seqs"][0]["meta"] == f"label: {HOSTILE_TEXT[:80]}…"


def test_viewer_sample_has_the_trace_routes(trace_dir):
    data = viewer_sample(open_trace(trace_dir)).data
    long_seq = data["seqs"][2]
    for li in range(len(LAYERS)):
        firsts = long_seq["e"][li][::K]
        assert firsts == [top1(2, pos, li) for pos in range(30)]
    assert long_seq["w"][0][:2] == [700, 300] and long_seq["w"][1][:2] == [625, 375]  # thousandths
    assert data["seqs"][1]["phase"] == "pppppp" + "g" * (len(WHITESPACE) - 6)
    assert data["seqs"][1]["text"] == WHITESPACE and data["seqs"][1]["tid"][:2] == [100, 101]
    assert len(data["colors"]) == E and data["E"] == E


def test_viewer_without_weights(tmp_path):
    data = viewer_sample(open_trace(make_trace(tmp_path / "t", weights=False))).data
    assert data["hasWeights"] is False and all(s["w"] is None for s in data["seqs"])


def test_truncation_notes(trace_dir):
    html = build_report([trace_dir], viewer_sequences=2, viewer_tokens=20)
    assert "Showing the first 2 of 3 sequences (by seq_id)." in html
    html = build_report([trace_dir], viewer_tokens=20)
    assert "All 3 sequences; 1 of them cut to their first 20 tokens." in html
    assert [s["n"] for s in viewer_json(html)[0]["seqs"]] == [11, 11, 20]
    sample = viewer_sample(open_trace(trace_dir), max_entries=(11 + 5) * len(LAYERS) * K)
    assert sample.shown == 1 and sample.budget_hit  # the second sequence does not fit the budget
    sample = viewer_sample(open_trace(trace_dir), sequences=1, max_entries=4 * len(LAYERS) * K)
    assert sample.data["seqs"][0]["n"] == 4 and sample.cut_sequences == 1 and sample.budget_hit  # cut to fit


def test_sections_found_in_a_directory_and_ordered(trace_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(report_html, "renderer", lambda name: None)  # generic sections: order only
    demo = tmp_path / "demo"
    make_trace(demo / "trace")
    make_results(demo / "b-zeta", "zeta", trace="../trace", score=1.0)
    make_results(demo / "c-signatures", "signatures", trace="../trace", within=0.8, across=0.6)
    make_results(demo / "a-alpha", "alpha", trace="../trace", score=2.0)
    make_results(demo / "d-stats", "stats", trace="../trace", entropy=1.0)
    make_results(demo / "e-pos", "pos", trace="../trace", accuracy=0.8)
    (demo / "notes").mkdir()
    found = collect_inputs([demo])
    assert found.traces == [demo / "trace"] and len(found.analyses) == 5
    html = build_report([demo])
    assert headings(html) == ["Model and trace", "Stats", "Signatures", "Pos", "Alpha", "Zeta", "Token viewer"]
    toc = re.findall(r'<li><a href="#[^"]+">(.*?)</a></li>', html)
    assert toc == ["About this report"] + headings(html)


def test_generic_section_for_unknown_analysis(tmp_path):
    out = make_results(tmp_path / "mystery", "mystery", trace=None, accuracy=0.91234567,
                       permutation_accuracy=0.25, n=1200, ok=True, missing=None, per_layer=[1, 2], text="a<b")
    html = build_report([out])
    assert headings(html) == ["Mystery"]
    section = html.split('id="mystery"')[1]
    assert "<code>accuracy</code></th><td class=\"num\">0.9123</td>" in section
    assert "<code>permutation_accuracy</code></th><td class=\"num\">0.25</td>" in section
    assert ">1,200<" in section and ">yes<" in section and ">n/a<" in section and "a&lt;b" in section
    assert "not shown here):\n<code>per_layer</code>" in section
    assert 'src="data:image/png;base64,' in section
    assert "Token viewer" not in html and "No analysis results" not in html


def test_failing_section_module_falls_back_to_generic(tmp_path, monkeypatch):
    def broken(results, out_dir, env):
        raise KeyError("within_mean")

    monkeypatch.setattr(report_html, "renderer", lambda name: broken)
    out = make_results(tmp_path / "sig", "signatures", score=0.5)
    with pytest.warns(UserWarning, match="could not be drawn"):
        html = build_report([out])
    assert "could not be drawn (KeyError" in html and ">0.5<" in html


def test_trace_named_by_results_gets_a_viewer(tmp_path):
    make_trace(tmp_path / "runs" / "trace", n_long=4)
    rel = make_results(tmp_path / "out" / "foo", "foo", trace="../../runs/trace")  # relative to results dir
    assert [s["n"] for s in viewer_json(build_report([rel]))[0]["seqs"]] == [11, 11, 4]
    gone = make_results(tmp_path / "gone", "foo", trace="no/such/trace")
    assert "Token viewer" not in build_report([gone])
    # a trace given explicitly wins over the one the results name
    other = make_trace(tmp_path / "other", n_long=3)
    assert [s["n"] for s in viewer_json(build_report([other, rel]))[0]["seqs"]] == [11, 11, 3]


def test_statistics_computed_for_a_trace(trace_dir, tmp_path, monkeypatch):
    from moescope.analysis.result import AnalysisResult

    calls = []

    def routing_statistics(trace):
        calls.append(trace.path)
        return AnalysisResult("stats", {"load_entropy": 0.97, "load_entropy_uniform": 1.0})

    fake = type(sys)("moescope.analysis.stats")
    fake.routing_statistics = routing_statistics
    monkeypatch.setitem(sys.modules, "moescope.analysis.stats", fake)
    monkeypatch.setattr(report_html, "renderer", lambda name: None)
    html = build_report([trace_dir])
    assert calls == [trace_dir] and "load_entropy_uniform" in html
    assert headings(html) == ["Model and trace", "Stats", "Token viewer"]
    # statistics already among the inputs are not computed again
    given = make_results(tmp_path / "stats", "stats", trace=str(trace_dir), load_entropy=0.5)
    assert headings(build_report([trace_dir, given])).count("Stats") == 1 and len(calls) == 1


def test_expert_colours_are_distinct_and_legible():
    for n in (2, 8, 20, 21, 64, 128, 256):
        colours = expert_colors(n)
        assert len(colours) == n and len(set(colours)) == n
        assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    for colour in expert_colors(20) + expert_colors(256):
        fg, bg = _luminance(ink_for(colour)), _luminance(colour)
        assert (max(fg, bg) + 0.05) / (min(fg, bg) + 0.05) >= 4.5  # WCAG AA for body text


def test_input_errors(tmp_path):
    with pytest.raises(MoescopeError, match="does not exist"):
        build_report([tmp_path / "nope"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(MoescopeError, match="neither a trace") as err:
        build_report([tmp_path / "empty"])
    assert "\n" not in str(err.value)


def test_write_report_and_cli(trace_dir, tmp_path):
    path = write_report([trace_dir], tmp_path / "sub" / "r.html", viewer_sequences=1)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    out = tmp_path / "cli.html"
    run = subprocess.run([sys.executable, "-c", "from moescope.cli import main; main()", "report", str(trace_dir),
                          "--out", str(out), "--sequences", "2", "--title", "T"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out) and "<title>T</title>" in out.read_text(encoding="utf-8")
    bad = subprocess.run([sys.executable, "-c", "from moescope.cli import main; main()", "report",
                          str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_two_runs_of_one_analysis_get_titles_that_tell_them_apart(trace_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(report_html, "renderer", lambda name: None)
    a = make_results(tmp_path / "semantic-default", "semantic", trace=None, score=1.0)
    b = make_results(tmp_path / "semantic-random-init", "semantic", trace=None, score=0.5)
    c = make_results(tmp_path / "pos-default", "pos", trace=None, accuracy=0.8)
    html = build_report([a, b, c])
    assert headings(html) == ["Semantic — semantic-default", "Semantic — semantic-random-init", "Pos"]


def test_traces_with_the_same_directory_name_are_named_with_their_parent(tmp_path):
    a, b = make_trace(tmp_path / "run-a" / "trace"), make_trace(tmp_path / "run-b" / "trace")
    html = build_report([a, b])
    assert headings(html) == ["Model and trace — run-a/trace", "Model and trace — run-b/trace",
                              "Token viewer — run-a/trace", "Token viewer — run-b/trace"]
