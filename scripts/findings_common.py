"""Generated findings in the docs: every figure a doc quotes comes from a committed results.json.

A doc holds blocks delimited by

    <!-- BEGIN generated:NAME -->
    ... text written by scripts/findings_<study>.py ...
    <!-- END generated:NAME -->

Each ``scripts/findings_<study>.py`` reads the results.json files it needs (committed under
``docs/results/<study>/``), renders the blocks' text and calls :func:`write_blocks`. With
``--check`` nothing is written and the script exits 1 when a doc is stale, which is what
tests/test_docs_findings.py runs for every findings script.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def load_results(study: str, name: str = "results.json") -> dict:
    """The committed results.json of one study run (``docs/results/<study>/<name>``)."""
    return json.loads((RESULTS / study / name).read_text())


def fmt_p(p: float | None, n_permutations: int | None = None) -> str:
    """A p-value as a reader should see it: at a permutation floor, ``p ≤ 1/(n+1)``, never ``p = ``."""
    if p is None:
        return "p = n/a"
    if n_permutations is not None and p <= 1.0 / (n_permutations + 1) + 1e-12:
        return f"p ≤ {1.0 / (n_permutations + 1):.3g}"
    if p < 1e-4:
        return "p < 0.0001"
    return f"p = {p:.3g}"


def _block_re(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- BEGIN generated:{re.escape(name)} -->\n)(.*?)(<!-- END generated:{re.escape(name)} -->)",
        re.S,
    )


def write_blocks(doc: Path, blocks: dict[str, str], check: bool) -> bool:
    """Replace each named block of `doc` with its text.

    Returns True when the doc already held exactly this text (with ``check`` nothing is written).
    Raises SystemExit with one line when a block is missing from the doc.
    """
    text = doc.read_text()
    new = text
    for name, body in blocks.items():
        pattern = _block_re(name)
        if not pattern.search(new):
            raise SystemExit(f"{doc}: no block <!-- BEGIN generated:{name} --> ... <!-- END generated:{name} -->")
        body = body.rstrip("\n") + "\n"
        new = pattern.sub(lambda m: m.group(1) + body + m.group(3), new)
    if new == text:
        return True
    if not check:
        doc.write_text(new)
    return False


def main_for(render: "callable[[], dict[Path, dict[str, str]]]") -> None:
    """Command-line entry of a findings script: render, then write (or ``--check``)."""
    check = "--check" in sys.argv[1:]
    stale = [str(doc.relative_to(REPO)) for doc, blocks in render().items() if not write_blocks(doc, blocks, check)]
    if check and stale:
        print(f"stale generated findings in {', '.join(stale)}: run the findings scripts (scripts/findings_*.py)")
        sys.exit(1)
