"""The code blocks of README.md and docs/**/*.md, and the runner that executes them.

Executed: ```python and ```bash blocks (also ```sh / ```shell). Not executed: every other
fence (```text, ```console, ```json, ...) and any block preceded by a marker line

    <!-- not run: why (e.g. needs a GPU, a hub model, a Ray cluster) -->

which the test counts and reports. A block that runs but takes long is preceded by

    <!-- slow: why -->

and runs only in the slow test (``pytest -m slow``). Run as a script, this module executes the blocks of
one JSON list in a single process (a `moescope` start costs seconds of imports):

- each markdown file runs in a fresh copy of a prepared directory holding the paths the
  docs use: ``prompts.jsonl`` (labelled), ``runs/olmoe`` and ``runs/trace`` (traces of
  it by the built-in model), a tiny ``moescope/data/prompts/tasks.jsonl`` and the
  built-in model at ``moescope/data/default_model``;
- python blocks run with ``exec`` in a fresh namespace, in file order;
- bash blocks made only of ``moescope ...`` commands run through the CLI's ``main`` in
  this process; any other bash block runs in bash with a ``moescope`` shim on PATH.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

RUN_LANGS = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<why>.+?)\s*-->\s*$")
SLOW = re.compile(r"^\s*<!--\s*slow:\s*(?P<why>.+?)\s*-->\s*$")


@dataclass
class Block:
    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str  # "python" or "bash", or the fence's own language if not run
    code: str
    not_run: str | None = None  # the marker's reason, or "fence <lang>" for other languages
    slow: str | None = None  # the slow marker's reason: run only by the slow test

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files(root: Path) -> list[Path]:
    """README.md, then docs/**/*.md in path order."""
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def extract_blocks(path: Path, root: Path) -> list[Block]:
    """Every fenced block of a markdown file, with its language and not-run marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group("indent"), m.group("lang").lower()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:j]]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = NOT_RUN.match(lines[k]) if k >= 0 else None
        slow = SLOW.match(lines[k]) if k >= 0 else None
        runnable = RUN_LANGS.get(lang)
        reason = marker.group("why") if marker else (None if runnable else f"fence {lang or '(none)'}")
        blocks.append(Block(str(path.relative_to(root)), i + 1, runnable or lang, "\n".join(body) + "\n", reason,
                            slow.group("why") if slow else None))
        i = j + 1
    return blocks


def moescope_commands(code: str) -> list[list[str]] | None:
    """The argument lists of a bash block made only of `moescope` commands (joined with
    newlines or `&&`, with comments and line continuations); None if it holds anything else."""
    text = code.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in text.splitlines():
        if re.search(r"[|;<>`$]|\bfor\b|\bdo\b", line.split("#")[0]):
            return None
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            return None
        current: list[str] = []
        for word in words + ["&&"]:
            if word == "&&":
                if current:
                    if current[0] != "moescope":
                        return None
                    commands.append(current[1:])
                current = []
            else:
                current.append(word)
    return commands


# -- the runner (a separate process) ------------------------------------------------------------

PROMPTS = [
    {"text": "def add(a, b):\n    return a + b", "label": "code"},
    {"text": "Write a Python function that reverses a list.", "label": "code"},
    {"text": "Fix this loop so it stops skipping items.", "label": "code"},
    {"text": "Once upon a time a lighthouse keeper watched the sea.", "label": "story"},
    {"text": "The fox ran through the snowy forest at night.", "label": "story"},
    {"text": "A girl found a map in her grandmother's attic.", "label": "story"},
    {"text": "What is 12 times 7? It is 84.", "label": "math"},
    {"text": "Solve for x: 3x + 5 = 20.", "label": "math"},
    {"text": "What is the sum of the first ten odd numbers?", "label": "math"},
]


def prepare(base: Path, root: Path) -> None:
    """The directory every markdown file's blocks start from (see the module docstring)."""
    import moescope
    from moescope.capture.loading import load_model

    base.mkdir(parents=True)
    (base / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    data = base / "moescope" / "data"
    (data / "prompts").mkdir(parents=True)
    os.symlink(root / "moescope" / "data" / "default_model", data / "default_model")
    per_label: dict[str, int] = {}
    with open(root / "moescope" / "data" / "prompts" / "tasks.jsonl", encoding="utf-8") as src, \
            open(data / "prompts" / "tasks.jsonl", "w", encoding="utf-8") as dst:
        for line in src:
            label = json.loads(line)["label"]
            if per_label.get(label, 0) < 3:
                per_label[label] = per_label.get(label, 0) + 1
                dst.write(line)
    model, tok = load_model(None)
    moescope.capture_dataset(model, tok, base / "prompts.jsonl", base / "runs" / "olmoe")  # as README's `capture`
    shutil.copytree(base / "runs" / "olmoe", base / "runs" / "trace")
    from moescope.analysis import routing_signatures, routing_statistics

    trace = moescope.open_trace(base / "runs" / "olmoe")  # analyses docs/report.md reports
    routing_statistics(trace, label="label", permutations=10).save(base / "runs" / "olmoe-stats")
    routing_signatures(trace, label="label", permutations=10, control_draws=1).save(base / "runs" / "olmoe-sig")


def _shim(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("moescope", f'"{sys.executable}" -m moescope.cli'), ("python", f'"{sys.executable}"')):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nexec {target} \"$@\"\n")
        path.chmod(0o755)


def _run_cli(args: list[str]) -> None:
    from moescope.cli import main

    argv = sys.argv
    sys.argv = ["moescope", *args]
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"`moescope {shlex.join(args)}` exited with {exc.code}") from None
    finally:
        sys.argv = argv


def run_block(block: Block, bin_dir: Path) -> None:
    """Execute one block in the current directory; raises on failure."""
    if block.lang == "python":
        exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})  # noqa: S102
        import matplotlib.pyplot as plt

        plt.close("all")
        return
    commands = moescope_commands(block.code)
    if commands is not None:
        for args in commands:
            _run_cli(args)
        return
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], env=env, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode:
        raise RuntimeError(f"bash exited with {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")


def main(blocks_json: str, work: str, results_json: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    root = Path(__file__).resolve().parent.parent
    blocks = [Block(**b) for b in json.loads(Path(blocks_json).read_text())]
    work_dir = Path(work)
    base, bin_dir = work_dir / "base", work_dir / "bin"
    prepare(base, root)
    _shim(bin_dir)
    results = []
    by_file: dict[str, list[Block]] = {}
    for b in blocks:
        by_file.setdefault(b.file, []).append(b)
    for n, (file, file_blocks) in enumerate(by_file.items()):
        here = work_dir / f"doc{n}"
        shutil.copytree(base, here, symlinks=True)
        os.chdir(here)
        for block in file_blocks:
            started = time.perf_counter()
            error = None
            try:
                run_block(block, bin_dir)
            except BaseException as exc:  # noqa: BLE001 - every failure is reported with its block
                error = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
                tb = traceback.extract_tb(exc.__traceback__)
                doc_frames = [f for f in tb if f.filename == block.where]
                if doc_frames:
                    error += f" (block line {doc_frames[-1].lineno})"
            results.append({**asdict(block), "error": error, "seconds": round(time.perf_counter() - started, 1)})
        os.chdir(work_dir)
    Path(results_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
