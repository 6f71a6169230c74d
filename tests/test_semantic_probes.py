"""Probe data: WordNet WiC-style pairs and substitution items, the WiC / SWORDS loaders, the probe file."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from moescope.errors import DataError
from moescope.semantic.loaders import load_swords, load_wic
from moescope.semantic.pipeline import probe_records, read_probes, write_probes
from moescope.semantic.probes import Context, find_target, inflections, wordnet_pairs, wordnet_substitutions
from moescope.wordnet import DEFAULT_DIR, iter_synsets, read_exceptions


def test_locating_inflected_targets():
    verbs = read_exceptions(DEFAULT_DIR, "verb")
    assert "ran" in inflections("run", "v", verbs) and "running" in inflections("run", "v", verbs)
    assert {"stopped", "makes", "making", "tried", "dying"} <= {
        *inflections("stop", "v"), *inflections("make", "v"), *inflections("try", "v"), *inflections("die", "v")}
    assert {"bigger", "happiest"} <= {*inflections("big", "a"), *inflections("happy", "a")}
    forms = inflections("run", "v", verbs)
    assert find_target("She ran home; he runs.", forms) == (4, 7)
    assert find_target("the dog's bone", inflections("dog", "n")) == (4, 7)
    assert find_target("Banks closed", inflections("bank", "n")) == (0, 5)
    assert find_target("a well-known fact", ["well"]) is None  # part of a compound, not the word
    assert find_target("the rerun", forms) is None


@pytest.fixture(scope="module")
def pairs():
    return wordnet_pairs(400, seed=3)


def test_wordnet_pairs_balanced_deterministic_and_located(pairs):
    assert len(pairs) == 400 and Counter(p.label for p in pairs) == {"same": 200, "different": 200}
    assert wordnet_pairs(400, seed=3) == pairs and wordnet_pairs(400, seed=4) != pairs
    per_lemma = Counter((p.lemma, p.pos, p.label) for p in pairs)
    assert all(per_lemma[(lemma, pos, "same")] == per_lemma[(lemma, pos, "different")] for lemma, pos, _ in per_lemma)
    for p in pairs:
        assert (p.label == "same") == (p.sense_a == p.sense_b) and p.a.text != p.b.text
        for ctx in (p.a, p.b):
            assert ctx.word.lower() in inflections(p.lemma, p.pos, read_exceptions(DEFAULT_DIR, {
                "n": "noun", "v": "verb", "a": "adj", "r": "adv"}[p.pos]))
            assert " " not in ctx.word and ctx.text[ctx.start:ctx.end] == ctx.word


def test_wordnet_substitutions():
    items = wordnet_substitutions(60, seed=1)
    assert len(items) == 60 and items == wordnet_substitutions(60, seed=1)
    synsets = {s.key: s for name in ("noun", "verb", "adj", "adv") for s in iter_synsets(DEFAULT_DIR, name)}
    senses_of = {}
    for s in synsets.values():
        for w in s.lemmas:
            senses_of.setdefault((w, s.key[-1]), set()).add(s.key)
    for it in items:
        assert it.original.word.lower() == it.lemma  # base form, so substitutes fit
        assert len(it.controls) == len(it.substitutes) >= 1
        assert set(it.substitutes) <= set(synsets[it.sense].lemmas) and it.lemma not in it.substitutes
        related = {w for key in senses_of[(it.lemma, it.pos)] for w in synsets[key].lemmas}
        assert not set(it.controls) & related
        sub = it.original.replace(it.substitutes[0])
        assert sub.word.lower() == it.substitutes[0] and sub.text.endswith(it.original.text[it.original.end:])


def test_probe_file_roundtrip(pairs, tmp_path):
    items = wordnet_substitutions(10, seed=0)
    records = probe_records(pairs[:20], items)
    assert len(records) == 40 + sum(1 + len(i.substitutes) + len(i.controls) for i in items)
    path = write_probes(tmp_path / "probes.jsonl", records)
    first = path.read_bytes()
    write_probes(path, probe_records(pairs[:20], items))
    assert path.read_bytes() == first  # deterministic bytes: a capture of it resumes instead of restarting
    table = read_probes(path)
    assert table.column("seq_id").to_pylist() == list(range(len(records)))
    for row in table.to_pylist():
        assert row["text"][row["target_start"]:row["target_end"]] == row["word"]
    assert Counter(table.column("role").to_pylist())["original"] == 10


def test_capitalised_replacement():
    ctx = Context("Banks fail.", 0, 5)
    assert ctx.replace("lender") == Context("Lender fail.", 0, 6)


# -- loaders of the original datasets ------------------------------------------------------------
WIC_DATA = (
    "bank\tN\t1-4\tThe bank was closed .\tWe sat on the bank of the river .\n"
    "run\tV\t1-0\tShe ran a company .\tRunning the firm is hard .\n"
    "play\tV\t3-1\tThe kids will play outside .\tThey played football .\n"
)


def test_load_wic(tmp_path):
    split = tmp_path / "WiC_dataset" / "dev"
    split.mkdir(parents=True)
    (split / "dev.data.txt").write_text(WIC_DATA)
    (split / "dev.gold.txt").write_text("F\nT\nT\n")
    pairs = load_wic(split)
    assert [p.label for p in pairs] == ["different", "same", "same"]
    assert [(p.a.word, p.b.word) for p in pairs] == [("bank", "bank"), ("ran", "Running"), ("play", "played")]
    assert pairs[0].lemma == "bank" and pairs[0].pos == "n" and pairs[1].pos == "v"
    assert load_wic(split / "dev.data.txt") == pairs
    assert [p.label for p in load_wic(split, n_pairs=2, seed=0)] == ["different", "same"]
    with pytest.raises(DataError, match="pass one, e.g. --wic"):
        load_wic(tmp_path / "WiC_dataset")
    (split / "dev.gold.txt").unlink()
    with pytest.raises(DataError, match="no gold labels"):
        load_wic(split)
    (split / "dev.gold.txt").write_text("F\nT\n")
    with pytest.raises(DataError, match="3 lines but dev.gold.txt has 2"):
        load_wic(split)


def _swords():
    text = "My favorite thing about her is her straightforward honesty."
    return {
        "contexts": {"c1": {"context": text, "extra": None}, "c2": {"context": "A big dog.", "extra": None}},
        "targets": {
            "t1": {"context_id": "c1", "target": "straightforward", "offset": 35, "pos": "ADJ"},
            "t2": {"context_id": "c2", "target": "dog", "offset": 99, "pos": "NOUN"},  # wrong offset
        },
        "substitutes": {
            "s1": {"target_id": "t1", "substitute": "frank"}, "s2": {"target_id": "t1", "substitute": "candid"},
            "s3": {"target_id": "t1", "substitute": "sincere"}, "s4": {"target_id": "t1", "substitute": "final"},
            "s5": {"target_id": "t1", "substitute": "sum total"}, "s6": {"target_id": "t2", "substitute": "hound"},
        },
        "substitute_labels": {
            "s1": ["TRUE", "TRUE", "FALSE"], "s2": ["TRUE", "TRUE", "TRUE"], "s3": ["TRUE", "FALSE", "FALSE"],
            "s4": ["FALSE", "FALSE", "FALSE"], "s5": ["FALSE_IMPLICIT"], "s6": ["TRUE"],
        },
    }


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_load_swords(tmp_path, suffix):
    path = tmp_path / f"swords{suffix}"
    data = json.dumps(_swords()).encode()
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.warns(UserWarning, match="skipped 1 target"):
        items = load_swords(path)
    assert len(items) == 1
    it = items[0]
    assert it.original.word == "straightforward" and it.pos == "a" and it.sense == "t1"
    assert it.substitutes == ("candid", "frank")  # score >= 0.5, best first; "sincere" (1/3) is neither
    assert set(it.controls) == {"final", "sum total"}  # score 0, multiword kept
    assert it.original.replace("sum total").word == "sum total"


def test_load_swords_refuses_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"contexts": {}}')
    with pytest.raises(DataError, match="lacks the SWORDS key"):
        load_swords(path)


def test_build_probes_from_the_original_datasets(tmp_path):
    from moescope.semantic.pipeline import build_probes

    split = tmp_path / "dev"
    split.mkdir()
    (split / "dev.data.txt").write_text(WIC_DATA)
    (split / "dev.gold.txt").write_text("F\nT\nT\n")
    swords = tmp_path / "swords.json"
    swords.write_text(json.dumps(_swords()))
    with pytest.warns(UserWarning):
        records = build_probes(n_pairs=10, n_items=5, wic=split, swords=swords)
    assert Counter((r["probe"], r["source"]) for r in records) == {("wic", "wic"): 6, ("sub", "swords"): 5}
    assert all(r["text"][r["target_start"]:r["target_end"]] == r["word"] for r in records)
    assert [r["word"] for r in records if r["probe"] == "sub"][:3] == ["straightforward", "candid", "frank"]
