"""Checks on the built-in prompt sets in moescope/data/prompts/."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

import pytest

PROMPTS = Path(__file__).resolve().parents[1] / "moescope" / "data" / "prompts"
TASKS = PROMPTS / "tasks.jsonl"
SHARED = PROMPTS / "shared_vocab.jsonl"

TASK_LABELS = {"code", "math", "story", "factual"}
SHARED_LABELS = {"story", "factual", "question"}


def _load(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{path.name}:{lineno}: blank line"
            row = json.loads(line)
            assert isinstance(row, dict), f"{path.name}:{lineno}: not a JSON object"
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tasks() -> list[dict]:
    return _load(TASKS)


@pytest.fixture(scope="module")
def shared() -> list[dict]:
    return _load(SHARED)


def _words(text: str) -> int:
    return len(text.split())


def _content_words(text: str) -> set[str]:
    """Lowercased alphabetic words of length >= 4."""
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _common_checks(rows: list[dict], fields: set[str], labels: set[str]) -> None:
    for row in rows:
        assert set(row) == fields, f"{row.get('id')}: fields {sorted(row)}"
        for key in fields:
            assert isinstance(row[key], str) and row[key].strip(), f"{row['id']}: empty {key}"
        assert row["label"] in labels, f"{row['id']}: unknown label {row['label']!r}"
        assert row["text"] == row["text"].strip(), f"{row['id']}: surrounding whitespace"
        assert "\ufffd" not in row["text"], f"{row['id']}: replacement character"
        assert row["doc_id"] == row["id"], f"{row['id']}: every prompt is its own document"
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    texts = [" ".join(r["text"].lower().split()) for r in rows]
    assert len(texts) == len(set(texts)), "exact duplicate texts"


# --- tasks.jsonl ----------------------------------------------------------------------


def test_tasks_fields_ids_and_duplicates(tasks):
    _common_checks(tasks, {"id", "doc_id", "label", "text", "source"}, TASK_LABELS)
    for row in tasks:
        assert row["id"].startswith(row["label"] + "-"), row["id"]


def test_tasks_counts_per_label(tasks):
    counts = Counter(r["label"] for r in tasks)
    assert set(counts) == TASK_LABELS
    for label in TASK_LABELS:
        assert counts[label] >= 30, (label, counts[label])


def test_tasks_lengths(tasks):
    for row in tasks:
        n = _words(row["text"])
        assert 15 <= n <= 80, (row["id"], n)
    # lengths should vary within each category, not all be one size
    for label in TASK_LABELS:
        ns = [_words(r["text"]) for r in tasks if r["label"] == label]
        assert max(ns) - min(ns) >= 20, (label, min(ns), max(ns))


def test_tasks_no_near_duplicates(tasks):
    sets = [(r["id"], _content_words(r["text"])) for r in tasks]
    worst = max((_jaccard(a, b), i, j) for (i, a), (j, b) in itertools.combinations(sets, 2))
    # measured maximum is about 0.37; two rewordings of one prompt would score far higher
    assert worst[0] < 0.5, worst


# --- shared_vocab.jsonl ---------------------------------------------------------------


def test_shared_fields_ids_and_duplicates(shared):
    _common_checks(shared, {"id", "doc_id", "label", "subject", "text", "source"}, SHARED_LABELS)


def test_shared_every_subject_has_all_three_forms(shared):
    by_subject: dict[str, list[str]] = defaultdict(list)
    for row in shared:
        by_subject[row["subject"]].append(row["label"])
    assert len(by_subject) >= 24, len(by_subject)
    for subject, labels in by_subject.items():
        assert sorted(labels) == sorted(SHARED_LABELS), (subject, labels)


def test_shared_lengths(shared):
    for row in shared:
        n = _words(row["text"])
        assert 20 <= n <= 60, (row["id"], n)


def test_shared_form_markers(shared):
    # questions ask, the other two forms state
    for row in shared:
        n_q = row["text"].count("?")
        if row["label"] == "question":
            assert n_q >= 1, row["id"]
        else:
            assert n_q == 0, row["id"]


def test_shared_vocabulary_property(shared):
    """Texts about the same subject share far more content words than texts about
    different subjects. Measured on the shipped set: same-subject mean Jaccard ~0.34,
    different-subject mean ~0.02 (ratio ~18). Assert a conservative margin."""
    same, diff = [], []
    for a, b in itertools.combinations(shared, 2):
        j = _jaccard(_content_words(a["text"]), _content_words(b["text"]))
        (same if a["subject"] == b["subject"] else diff).append(j)
    same_mean, diff_mean = mean(same), mean(diff)
    assert same_mean > 0.25, same_mean
    assert same_mean > 5 * diff_mean, (same_mean, diff_mean)
    # and no single subject is an outlier with little shared wording
    per_subject: dict[str, list[float]] = defaultdict(list)
    for a, b in itertools.combinations(shared, 2):
        if a["subject"] == b["subject"]:
            per_subject[a["subject"]].append(
                _jaccard(_content_words(a["text"]), _content_words(b["text"]))
            )
    for subject, js in per_subject.items():
        assert mean(js) > 2 * diff_mean, (subject, mean(js), diff_mean)
