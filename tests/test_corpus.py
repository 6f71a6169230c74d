"""The offline corpus builder and its tokenizer (small builds: about 15 s in all)."""
from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import typer
from tokenizers import Tokenizer
from typer.testing import CliRunner

from moescope.errors import DataError
from moescope.train import corpus_sources
from moescope.train.corpus import DOMAINS, SPLITS, CorpusInfo, build_corpus, select_documents
from moescope.train.corpus_math import generate_math_documents
from moescope.train.corpus_sources import Document
from moescope.train.corpus_text import chunk_text, html_to_text, rst_to_text

SMALL = {"chars_per_domain": 20_000, "vocab_size": 512}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CorpusInfo]:
    a, b = tmp_path_factory.mktemp("corpus_a"), tmp_path_factory.mktemp("corpus_b")
    info = build_corpus(a, **SMALL)
    build_corpus(b, **SMALL)
    return a, b, info


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _records(root: Path, domain: str, split: str) -> list[dict[str, str]]:
    lines = (root / "text" / f"{domain}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_same_arguments_give_identical_bytes(built: tuple[Path, Path, CorpusInfo]) -> None:
    a, b, _ = built
    assert _files(a) == _files(b)
    assert len(_files(a)) == 2 * 2 * len(DOMAINS) + 3  # jsonl + bin per split, tokenizer x2, json
    for rel in _files(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_summary_matches_the_files(built: tuple[Path, Path, CorpusInfo]) -> None:
    a, _, info = built
    assert CorpusInfo.load(a) == info
    assert [d.name for d in info.domains] == list(DOMAINS)
    assert set(info.files) == set(_files(a)) - {"corpus.json"}
    for d in info.domains:
        for split in SPLITS:
            stats = getattr(d, split)
            records = _records(a, d.name, split)
            assert stats.documents == len(records)
            assert stats.characters == sum(len(r["text"]) for r in records)
            assert stats.tokens * 2 == (a / "tokens" / f"{d.name}.{split}.bin").stat().st_size
        assert d.train.characters <= SMALL["chars_per_domain"]
        assert d.val.characters <= round(0.05 * SMALL["chars_per_domain"])
        assert d.unigram_val_perplexity is not None and 1 < d.unigram_val_perplexity < SMALL["vocab_size"] * 4
        assert d.licence and d.licence_ref


def test_every_domain_has_both_splits_and_no_shared_document(built: tuple[Path, Path, CorpusInfo]) -> None:
    a, _, _ = built
    for domain in DOMAINS:
        train, val = _records(a, domain, "train"), _records(a, domain, "val")
        assert train and val, domain
        assert {r["domain"] for r in train + val} == {domain}
        train_ids, val_ids = {r["doc_id"] for r in train}, {r["doc_id"] for r in val}
        assert len(train_ids) == len(train) and len(val_ids) == len(val)  # ids are unique
        assert not train_ids & val_ids
        assert all(r["text"].strip() and r["source"] for r in train + val)


def test_token_files_decode_back_to_the_text(built: tuple[Path, Path, CorpusInfo]) -> None:
    a, _, info = built
    tok = Tokenizer.from_file(str(a / "tokenizer" / "tokenizer.json"))
    eos = info.tokenizer["eos_id"]
    for domain in DOMAINS:
        for split in SPLITS:
            ids = np.memmap(a / "tokens" / f"{domain}.{split}.bin", dtype="<u2", mode="r")
            assert ids[-1] == eos
            ends = np.flatnonzero(ids == eos)
            records = _records(a, domain, split)
            assert len(ends) == len(records)
            starts = np.concatenate([[0], ends[:-1] + 1])
            for k in sorted({0, len(records) // 2, len(records) - 1}):
                doc_ids = ids[starts[k] : ends[k]].tolist()
                assert tok.decode(doc_ids, skip_special_tokens=False) == records[k]["text"]


def test_tokenizer_loads_through_autotokenizer(built: tuple[Path, Path, CorpusInfo]) -> None:
    from transformers import AutoTokenizer

    a, _, _ = built
    t = AutoTokenizer.from_pretrained(a / "tokenizer")
    assert t.is_fast
    assert t.eos_token == t.bos_token == "<|endoftext|>" and t.eos_token_id == t.bos_token_id == 0
    assert t.pad_token == "<|pad|>" and t.pad_token_id == 1
    assert t.model_max_length == 1024 and len(t) == SMALL["vocab_size"]

    text = "The quick  fox said: déjà vu!\n    return x"
    enc = t(text, return_offsets_mapping=True)
    assert t.decode(enc["input_ids"]) == text
    for token, (start, end) in zip(t.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]):
        span = text[start:end]
        # trim_offsets: a word's span never starts with the space that the token carries
        assert not span.startswith(" ")
        plain = token.replace("Ġ", " ").replace("Ċ", "\n").strip(" ")
        if plain.isascii() and plain.strip():
            assert span.rstrip(" ") == plain.rstrip(" "), (token, span)
    # the byte pieces of one character (é is two tokens here) share that character's span
    spans = dict.fromkeys(tuple(o) for o in enc["offset_mapping"])
    assert "".join(text[s:e] for s, e in spans).replace("\n", "") == "".join(text.split())

    record = _records(a, "drama", "val")[0]
    ids = np.fromfile(a / "tokens" / "drama.val.bin", dtype="<u2")
    assert t(record["text"])["input_ids"] == ids[: int(np.argmax(ids == 0))].tolist()


def _coef(s: str) -> int:
    return {"": 1, "-": -1}.get(s, None) or int(s)


def _check_problem(question: str, answer: str) -> bool:
    """Recompute the answer from the question text alone; False if no pattern applies."""
    m = re.fullmatch(r"What is ([\d +\-*/()]+)\?", question)
    if m:
        value = eval(m.group(1), {"__builtins__": {}})  # noqa: S307: digits and operators only
        assert Fraction(value) == Fraction(answer), question
        return True
    if m := re.fullmatch(r"What is (\d+) (squared|cubed)\?", question):
        assert int(answer) == int(m.group(1)) ** (2 if m.group(2) == "squared" else 3)
        return True
    if m := re.fullmatch(r"What is (\S+) ([+\-*]) (\S+)\? Give the answer as a fraction in lowest terms\.", question):
        x, op, y = Fraction(m.group(1)), m.group(2), Fraction(m.group(3))
        assert Fraction(answer) == {"+": x + y, "-": x - y, "*": x * y}[op] and str(Fraction(answer)) == answer
        return True
    if m := re.fullmatch(r"Solve for x: (-?\d*)x ([+-]) (\d+) = (-?\d+)\.", question):
        x = int(answer.removeprefix("x = "))
        b = int(m.group(3)) * (1 if m.group(2) == "+" else -1)
        assert _coef(m.group(1)) * x + b == int(m.group(4)), question
        return True
    if m := re.fullmatch(r"Solve the system of equations: (.+) and (.+)\.", question):
        x, y = (int(v) for v in re.fullmatch(r"x = (-?\d+), y = (-?\d+)", answer).groups())
        for eq in m.groups():
            a, sign, b, c = re.fullmatch(r"(-?\d*)x ([+-]) (\d*)y = (-?\d+)", eq).groups()
            assert _coef(a) * x + (1 if sign == "+" else -1) * _coef(b) * y == int(c), question
        return True
    if m := re.fullmatch(r"If x = (-?\d+), what is (-?\d*)x\^2 ([+-]) (\d+)x ([+-]) (\d+)\?", question):
        v, a = int(m.group(1)), _coef(m.group(2))
        b = int(m.group(4)) * (1 if m.group(3) == "+" else -1)
        c = int(m.group(6)) * (1 if m.group(5) == "+" else -1)
        assert a * v * v + b * v + c == int(answer), question
        return True
    if m := re.fullmatch(r"What is the remainder when (\d+) is divided by (\d+)\?", question):
        assert int(m.group(1)) % int(m.group(2)) == int(answer)
        return True
    if m := re.fullmatch(r"What is the (greatest common divisor|least common multiple) of (\d+) and (\d+)\?", question):
        f = math.gcd if m.group(1).startswith("greatest") else math.lcm
        assert f(int(m.group(2)), int(m.group(3))) == int(answer)
        return True
    if m := re.fullmatch(r"What is (\d+)% of (\d+)\?", question):
        assert Fraction(int(m.group(1)) * int(m.group(2)), 100) == int(answer)
        return True
    if m := re.fullmatch(r"\w+ buys (\d+) \w+ at (\d+) dollars each and pays with a (\d+)-dollar bill\..*", question):
        q, p, bill = map(int, m.groups())
        assert bill - q * p == int(answer) >= 0
        return True
    if m := re.fullmatch(r"A train travels at (\d+) km per hour for (\d+) hours\..*", question):
        assert int(m.group(1)) * int(m.group(2)) == int(answer)
        return True
    if m := re.fullmatch(r"\w+ shares (\d+) \w+ equally among (\d+) friends\..*", question):
        n, k = int(m.group(1)), int(m.group(2))
        assert answer == f"{n // k} each, {n % k} left over"
        return True
    if m := re.fullmatch(r"\w+ is (\d+) years older than \w+\. Together their ages add up to (\d+)\..*", question):
        gap, total = int(m.group(1)), int(m.group(2))
        assert 2 * int(answer) + gap == total
        return True
    if m := re.fullmatch(r"A rectangle is (\d+) m wide and (\d+) m long\..*", question):
        w, h = int(m.group(1)), int(m.group(2))
        assert answer == f"area {w * h} square m, perimeter {2 * (w + h)} m"
        return True
    if m := re.fullmatch(r"\w+ saves (\d+) dollars a week\. After how many weeks will \w+ have (\d+) dollars\?", question):
        assert int(m.group(1)) * int(answer) == int(m.group(2))
        return True
    return False


@pytest.mark.parametrize("seed", [0, 7])
def test_math_problems_carry_correct_answers(seed: int) -> None:
    docs = generate_math_documents(seed, 40_000)
    assert docs == generate_math_documents(seed, 40_000)  # deterministic
    problems = [p for _, text in docs for p in text.split("\n\n")]
    assert len(problems) > 200
    for block in problems:
        lines = block.split("\n")
        assert lines[0].startswith("Problem: ") and lines[-1].startswith("Answer: "), block
        assert _check_problem(lines[0][len("Problem: "):], lines[-1][len("Answer: "):]), block


def test_missing_source_is_a_one_line_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_sources, "WORDNET_DIR", tmp_path / "no-wordnet")
    with pytest.raises(DataError, match=r"wordnet-base.*scripts/install\.sh") as exc:
        build_corpus(tmp_path / "out", **SMALL)
    assert "\n" not in str(exc.value)
    monkeypatch.setattr(corpus_sources, "BIBLE_PROGRAM", "no-such-bible-program")
    with pytest.raises(DataError, match=r"bible-kjv"):
        build_corpus(tmp_path / "out", **SMALL)

    # through the command: the DataError propagates for moescope.cli.main to print in one line
    from moescope.commands import data

    app = typer.Typer()
    data.register(app)
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "cli")], standalone_mode=False)
    assert isinstance(result.exception, DataError)


def test_selection_keeps_groups_in_one_split_and_respects_budgets() -> None:
    docs = [Document(f"d{g}-{k}", f"g{g}", "synthetic", f"line {g} {k}\n" * 30) for g in range(60) for k in range(3)]
    train, val = select_documents(docs, "x", seed=3, chars_per_domain=9000, val_fraction=0.1)
    assert sum(len(d.text) for d in train) <= 9000 and sum(len(d.text) for d in val) <= 900
    assert {d.group for d in train}.isdisjoint({d.group for d in val})
    other_train, _ = select_documents(docs, "x", seed=4, chars_per_domain=9000, val_fraction=0.1)
    assert [d.doc_id for d in other_train] != [d.doc_id for d in train]  # the seed matters


def test_text_helpers() -> None:
    pieces = chunk_text("para one\n\n" + "x" * 50 + "\n\npara three", 30)
    assert all(0 < len(p) <= 30 for p in pieces) and "".join(pieces).replace("\n", "") == (
        "para one" + "x" * 50 + "para three")
    rst = "Title\n=====\n\n.. index:: single: foo\n\nUse :func:`len` and ``x``, see :pep:`8`.\n\n.. versionadded:: 3.2\n"
    assert rst_to_text(rst) == "Title\n\nUse len and x, see PEP 8.\n\nNew in version 3.2.\n"
    html = '<html><nav>menu</nav><div role="main"><h1>Hi&para;</h1><p>a  <b>b</b></p><pre>x = 1\n  y</pre></div>'
    assert html_to_text(html) == "Hi\n\na b\n\nx = 1\n  y\n"


@pytest.mark.slow
def test_build_does_not_depend_on_thread_count(tmp_path: Path) -> None:
    """Separate processes (fresh hash seeds in the Rust trainer), 1 versus 4 rayon threads."""
    import os
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from moescope.train.corpus import build_corpus; "
            "build_corpus(Path(sys.argv[1]), chars_per_domain=500_000, vocab_size=2048)")
    for threads in ("1", "4"):
        env = {**os.environ, "RAYON_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / threads)], check=True, env=env,
                       cwd=Path(__file__).resolve().parents[1])
    assert _files(tmp_path / "1") == _files(tmp_path / "4")
    for rel in _files(tmp_path / "1"):
        assert (tmp_path / "1" / rel).read_bytes() == (tmp_path / "4" / rel).read_bytes(), rel
