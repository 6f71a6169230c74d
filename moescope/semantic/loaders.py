"""Loaders for the original WiC and SWORDS files, for users who have them.

WiC (Pilehvar & Camacho-Collados 2019; pilehvar.github.io/wic), one split per folder:

    <split>.data.txt   target <TAB> POS (N|V) <TAB> i-j <TAB> sentence 1 <TAB> sentence 2
    <split>.gold.txt   T or F, one line per data line (T: same sense)

``i`` and ``j`` are 0-based indices of the target among the whitespace-separated words of
sentence 1 and 2 (WiC sentences are pre-tokenised). The split folder, or its data file, is
accepted; the test split has no public gold labels and is refused.

SWORDS (Lee et al. 2021; github.com/p-lambda/swords), one JSON object (``.json`` or
``.json.gz``). Fields read (others are ignored):

    contexts[cid].context            the text
    targets[tid].context_id          its context
    targets[tid].target              the target word as written
    targets[tid].offset              character offset of the target in the context
    targets[tid].pos                 UD tag (NOUN, VERB, ADJ, ADV), optional
    substitutes[sid].target_id       the target it substitutes
    substitutes[sid].substitute      the substitute (may be several words)
    substitute_labels[sid]           annotator labels: "TRUE"/"FALSE" (SWORDS) or
                                     "TRUE_IMPLICIT"/"FALSE_IMPLICIT" (CoInCo etc.)

A substitute's score is the share of its labels starting with "TRUE". Good substitutes
score at least ``good`` (0.5), controls ("poor substitutes", as in Olson et al.) at most
``poor`` (0.0); targets with none of either are skipped, as are targets whose offset does
not point at the target word.
"""
from __future__ import annotations

import gzip
import json
import re
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import DataError
from moescope.semantic.probes import Context, SensePair, SubstitutionItem

__all__ = ["load_wic", "load_swords", "balanced_subset"]

_UD_POS = {"NOUN": "n", "PROPN": "n", "VERB": "v", "AUX": "v", "ADJ": "a", "ADV": "r"}


def _wic_files(path: Path) -> tuple[Path, Path]:
    """(data file, gold file) of a WiC split given its folder or data file."""
    if not path.exists():
        raise DataError(f"WiC path {path} does not exist; pass a split folder such as WiC_dataset/dev")
    if path.is_dir():
        found = sorted(path.glob("*data.txt"))
        if len(found) != 1:
            splits = sorted(p.parent.name for p in path.glob("*/*data.txt"))
            hint = f"it holds the splits {', '.join(splits)}; pass one, e.g. --wic {path / splits[0]}" if splits \
                else "expected one *data.txt file"
            raise DataError(f"{path} is not one WiC split: {hint}")
        path = found[0]
    gold = path.with_name(path.name.replace("data.txt", "gold.txt"))
    if not gold.is_file():
        raise DataError(
            f"{path} has no gold labels ({gold.name} is missing); the WiC test split has none, use train or dev"
        )
    return path, gold


def _word_span(sentence: str, index: int) -> tuple[int, int]:
    words = list(re.finditer(r"\S+", sentence))
    if not 0 <= index < len(words):
        raise IndexError(index)
    return words[index].start(), words[index].end()


def load_wic(path: str | Path, *, n_pairs: int | None = None, seed: int = 0) -> list[SensePair]:
    """Sense pairs of a WiC split (label "same" for gold T); a balanced subset when `n_pairs` is set."""
    data, gold = _wic_files(Path(path))
    lines = data.read_text(encoding="utf-8").splitlines()
    labels = [g.strip() for g in gold.read_text(encoding="utf-8").splitlines() if g.strip()]
    lines = [line for line in lines if line.strip()]
    if len(lines) != len(labels):
        raise DataError(f"{data} has {len(lines)} lines but {gold.name} has {len(labels)} labels; they must pair up")
    pairs = []
    for n, (line, label) in enumerate(zip(lines, labels), start=1):
        fields = line.split("\t")
        if len(fields) != 5 or label not in ("T", "F") or not re.fullmatch(r"\d+-\d+", fields[2]):
            raise DataError(f"{data} line {n}: expected target, POS, i-j, sentence 1, sentence 2 and a T/F label")
        target, pos, idx, s1, s2 = fields
        i, j = (int(x) for x in idx.split("-"))
        try:
            a, b = Context(s1, *_word_span(s1, i)), Context(s2, *_word_span(s2, j))
        except IndexError as exc:
            raise DataError(f"{data} line {n}: word index {exc} is past the end of its sentence") from exc
        pairs.append(SensePair(f"wic-{n - 1:06d}", target.lower(), pos.lower()[:1],
                               "same" if label == "T" else "different", a, b))
    return pairs if n_pairs is None else balanced_subset(pairs, n_pairs, seed)


def balanced_subset(pairs: list[SensePair], n_pairs: int, seed: int = 0) -> list[SensePair]:
    """A seeded subset with n_pairs // 2 pairs of each label (fewer if a label runs out), in input order."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in ("same", "different"):
        idx = np.array([i for i, p in enumerate(pairs) if p.label == label], dtype=np.int64)
        keep += rng.permutation(idx)[: n_pairs // 2].tolist()
    return [pairs[i] for i in sorted(keep)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"SWORDS file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a SWORDS JSON file ({exc}); pass e.g. swords-v1.1_dev.json.gz") from exc
    missing = [k for k in ("contexts", "targets", "substitutes", "substitute_labels")
               if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise DataError(f"{path} lacks the SWORDS key(s) {', '.join(missing)}; pass e.g. swords-v1.1_dev.json.gz")
    return obj


def load_swords(
    path: str | Path,
    *,
    good: float = 0.5,
    poor: float = 0.0,
    max_substitutes: int = 3,
    n_items: int | None = None,
    seed: int = 0,
) -> list[SubstitutionItem]:
    """Substitution items from a SWORDS-format JSON file: good substitutes vs poor ones as controls.

    Each item keeps its `max_substitutes` best good substitutes (highest score, then
    alphabetical) and as many poor ones (seeded random choice). Items come in a seeded
    random order; `n_items` keeps the first ones.
    """
    obj = _read_json(Path(path))
    by_target: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for sid, sub in obj["substitutes"].items():
        labels = obj["substitute_labels"].get(sid) or []
        score = sum(str(x).startswith("TRUE") for x in labels) / len(labels) if labels else float("nan")
        by_target[sub["target_id"]].append((score, sub["substitute"]))
    rng = np.random.default_rng(seed)
    items, bad_offsets = [], 0
    for tid in sorted(obj["targets"]):
        target = obj["targets"][tid]
        text = obj["contexts"][target["context_id"]]["context"]
        start = int(target["offset"])
        word = target["target"]
        if text[start : start + len(word)] != word:
            bad_offsets += 1
            continue
        scored = by_target.get(tid, [])
        goods = [w for s, w in sorted(scored, key=lambda x: (-x[0], x[1])) if s >= good and w != word]
        poors = sorted(w for s, w in scored if s <= poor and w != word)
        n = min(len(goods), len(poors), max_substitutes)
        if n == 0:
            continue
        poors = [poors[i] for i in rng.permutation(len(poors))[:n]]
        pos = _UD_POS.get(str(target.get("pos", "")).upper(), str(target.get("pos", "")).lower())
        items.append(SubstitutionItem("", word.lower(), pos, Context(text, start, start + len(word)),
                                      tuple(goods[:n]), tuple(poors), tid))
    if bad_offsets:
        warnings.warn(f"{path}: skipped {bad_offsets} target(s) whose offset does not point at the target word")
    order = rng.permutation(len(items))[: n_items if n_items is not None else len(items)]
    return [replace(items[j], item_id=f"sub-{i:06d}") for i, j in enumerate(order)]
