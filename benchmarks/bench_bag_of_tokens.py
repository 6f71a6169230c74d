"""The bag-of-tokens baseline over a real model's vocabulary: sparse dual fit vs densified rows.

    .venv/bin/python benchmarks/bench_bag_of_tokens.py            # writes benchmarks/results/bag_of_tokens.md
    .venv/bin/python benchmarks/bench_bag_of_tokens.py --quick    # smaller sizes (printed only)
    .venv/bin/python benchmarks/bench_bag_of_tokens.py --capped   # also 12,000 sequences (the capped vocabulary)

The signatures' bag-of-tokens baseline is ridge_cv on tf-idf of each sequence's token ids,
fitted per training fold. Over a real vocabulary (here 50,304 ids, OLMoE's size, Zipf-distributed
like text) a sequence set has tens of thousands of distinct ids, more columns than training
sequences. Before, each fold densified its rows (n x p float64) to take the n x n Gram
matrix; now the Gram matrix comes from sparse products (moescope.inference.ridge_sparse), and
above 8,192 training sequences the vocabulary is capped (signature_controls.cap_vocabulary).

Each case runs in a fresh process (peak RSS = its ru_maxrss, imports included): 5 x 5 CV, 4
labels whose texts differ in a small share of their tokens, 2 fold threads; "densified" passes
the same tf-idf rows to ridge_cv as dense arrays, which is the path every fold took before.
Both give the same predictions (checked here: the accuracy must agree to the last digit).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VOCAB, TOKENS, LABELS = 50_304, 512, 4


def bag(sequences: int, seed: int = 0):
    """(S, V) sparse token counts: Zipf(1.1) ids, each label shifting 5% of its tokens onto 200 ids
    of its own; labels balanced."""
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(seed)
    y = np.arange(sequences) % LABELS
    ids = (rng.zipf(1.1, size=(sequences, TOKENS)) - 1) % VOCAB
    own = rng.random((sequences, TOKENS)) < 0.05
    ids[own] = (VOCAB - 1 - (y[:, None] * 200 + rng.integers(0, 200, size=(sequences, TOKENS))))[own]
    rows = np.repeat(np.arange(sequences), TOKENS)
    return csr_matrix((np.ones(rows.size), (rows, ids.ravel())), shape=(sequences, VOCAB)), y


def child(mode: str, sequences: int) -> None:
    from moescope import inference as inf
    from moescope.analysis.signature_controls import bag_cap, tfidf_fold_features

    X, y = bag(sequences)
    X = X[:, np.flatnonzero(X.getnnz(axis=0))]  # the ids present, as token_count_matrix keeps
    splits = inf.repeated_grouped_splits(y, None, folds=5, repeats=5, seed=0)
    sparse_features = tfidf_fold_features(X)
    capped = bag_cap(max(len(tr) for rep in splits for tr, _ in rep), X.shape[1]) is not None

    def dense_features(j, tr, te):
        a, b = sparse_features(j, tr, te)
        return a.toarray(), b.toarray()

    started = time.perf_counter()
    res = inf.ridge_cv(sparse_features if mode == "sparse" else dense_features, y, splits, standardize=False,
                       n_jobs=2)
    print(json.dumps({"seconds": time.perf_counter() - started, "accuracy": res.accuracy, "ids": X.shape[1],
                      "capped": capped, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


def run(mode: str, sequences: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(sequences)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--capped", action="store_true", help="also 12,000 sequences (vocabulary capped; ~20 min more)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    cases = [(500, ("densified", "sparse"))] if args.quick else \
        [(2000, ("densified", "sparse")), (4000, ("densified", "sparse"))] + ([(12000, ("sparse",))] if args.capped else [])
    load = os.getloadavg()[0]
    rows = []
    for sequences, modes in cases:
        out = {mode: run(mode, sequences) for mode in modes}
        print(sequences, out, flush=True)
        rows.append((sequences, out))
    lines = ["# Bag-of-tokens baseline over a real vocabulary", "",
             f"`benchmarks/bench_bag_of_tokens.py`: ridge_cv on per-fold tf-idf of token counts ({VOCAB:,}-id "
             f"vocabulary, Zipf 1.1, {TOKENS} tokens per sequence, {LABELS} labels), 5 x 5 CV, 2 fold threads, each "
             f"case in a fresh process; load average {load:.2f} before the run on {os.cpu_count()} cores.", "",
             "| sequences | distinct ids | densified rows (before): wall s, peak GiB | sparse dual (now): wall s, peak GiB "
             "| time ratio | memory ratio | same accuracy |", "|---:|---:|---|---|---:|---:|---|"]
    for sequences, out in rows:
        new, old = out["sparse"], out.get("densified")
        cell_new = f"{new['seconds']:.1f} s, {new['peak_gib']:.2f} GiB" + (" (vocabulary capped)" if new["capped"] else "")
        if old is None:
            lines.append(f"| {sequences:,} | {new['ids']:,} | not run (one fold's rows alone: "
                         f"{0.8 * sequences * new['ids'] * 8 / 2**30:.1f} GiB dense) | {cell_new} | | | |")
            continue
        if "failed" in old:
            lines.append(f"| {sequences:,} | {new['ids']:,} | failed: {old['failed']} | {cell_new} | | | |")
            continue
        lines.append(f"| {sequences:,} | {new['ids']:,} | {old['seconds']:.1f} s, {old['peak_gib']:.2f} GiB | {cell_new} | "
                     f"{old['seconds'] / new['seconds']:.1f}x | {old['peak_gib'] / new['peak_gib']:.1f}x | "
                     f"{'yes' if old['accuracy'] == new['accuracy'] else 'NO'} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "bag_of_tokens.md").write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
