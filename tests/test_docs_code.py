"""Every ```python and ```bash block of README.md and docs/**/*.md runs (see docs_blocks.py).

Blocks that cannot run here (hub models, GPUs, Ray clusters, Spark, hour-long training)
are fenced as ```text / ```console or preceded by ``<!-- not run: why -->``; they are
counted and listed with -rP. One subprocess runs every other block, on the built-in model
and tiny data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from docs_blocks import Block, doc_files, extract_blocks, moescope_commands

ROOT = Path(__file__).resolve().parent.parent


def all_blocks() -> list[Block]:
    return [b for path in doc_files(ROOT) for b in extract_blocks(path, ROOT)]


def test_extractor_honours_markers_fences_and_indentation(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("intro\n```python\nprint(1)\n```\n<!-- not run: needs a GPU -->\n\n```bash\nmoescope capture\n```\n"
                  "```console\n$ moescope models\n```\n1. step\n   ```python\n   x = 1\n   ```\n")
    blocks = extract_blocks(md, tmp_path)
    assert [(b.lang, b.not_run) for b in blocks] == [("python", None), ("bash", "needs a GPU"),
                                                       ("console", "fence console"), ("python", None)]
    md.write_text("<!-- slow: 2 minutes -->\n```bash\nmoescope demo\n```\n")
    assert [(b.not_run, b.slow) for b in extract_blocks(md, tmp_path)] == [(None, "2 minutes")]
    assert blocks[3].code == "x = 1\n" and blocks[0].line == 2
    assert moescope_commands("moescope a --x 1 \\\n  --y 2   # c\nmoescope b && moescope c\n") == \
        [["a", "--x", "1", "--y", "2"], ["b"], ["c"]]
    assert moescope_commands("for s in 0 1; do moescope a; done") is None
    assert moescope_commands("ray start --head") is None


def test_every_code_block_of_the_docs_runs(tmp_path):
    """Every runnable block but those marked slow (about a minute on 2 quiet cores)."""
    run_blocks(tmp_path, slow=False)


@pytest.mark.slow
def test_the_slow_code_blocks_of_the_docs_run(tmp_path):
    """The blocks marked `<!-- slow: ... -->` (several minutes)."""
    run_blocks(tmp_path, slow=True)


def run_blocks(tmp_path: Path, *, slow: bool) -> None:
    blocks = all_blocks()
    runnable = [b for b in blocks if b.not_run is None and bool(b.slow) == slow]
    marked = [b for b in blocks if b.not_run is not None and not b.not_run.startswith("fence")]
    assert runnable, "no runnable block found"
    listing = tmp_path / "blocks.json"
    listing.write_text(json.dumps([asdict(b) for b in runnable]))
    results = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_blocks.py"), str(listing), str(tmp_path / "w"),
                           str(results)], capture_output=True, text=True, env=env, timeout=900)
    assert results.exists(), f"the docs runner failed before running blocks:\n{done.stderr[-3000:]}"
    outcome = json.loads(results.read_text())
    failed = [r for r in outcome if r["error"]]
    print(f"{len(outcome)} blocks run ({sum(r['seconds'] for r in outcome):.0f} s), {len(marked)} marked not run:")
    for r in outcome:
        print(f"  {r['seconds']:6.1f} s  {r['file']}:{r['line']}{'  FAILED' if r['error'] else ''}")
    for b in marked:
        print(f"  not run {b.where}: {b.not_run}")
    report = "\n\n".join(f"{r['file']}:{r['line']} ({r['lang']}):\n{r['code']}-> {r['error']}" for r in failed)
    assert not failed, f"{len(failed)} docs code block(s) fail:\n\n{report}\n\nrunner output:\n{done.stdout[-2000:]}"
