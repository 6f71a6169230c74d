"""Every figure quoted in the docs is generated from a committed results.json (scripts/findings_*.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("findings_*.py"))
SCRIPTS = [s for s in SCRIPTS if s.name != "findings_common.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_generated_findings_are_current(script: Path) -> None:
    run = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr


def test_fmt_p_states_the_permutation_floor() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from findings_common import fmt_p

    assert fmt_p(1 / 200, 199) == "p ≤ 0.005"
    assert fmt_p(0.03, 199) == "p = 0.03"
