"""The random-init control of the semantic study, tested rather than compared by eye.

A randomly initialised copy of the model (same config, same probe sentences) shows what the
probe design alone gives: same-sense WordNet pairs share more context than different-sense
ones, and any router, trained or not, routes similar contexts alike. The question is whether
training adds to that gap. Per lemma (the unit of the paired design), the trained model's
same − different gap minus the mean of the random copies' gaps over seeds is tested per layer:
Wilcoxon signed-rank, a bootstrap CI resampling lemmas, Holm across layers. Substitution
likewise, per item (one item per lemma). Pure: works on the ``values`` of semantic results,
which carry ``lemma_gaps`` / ``item_gaps``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["random_init_control"]


def _aligned(trained: dict, randoms: Sequence[dict], key: str, ids: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(trained gaps (n, L), mean random gaps (n, L), ids) over the ids present in every run."""
    def table(v: dict) -> dict[str, np.ndarray]:
        g = v[key]
        return dict(zip(g[ids], np.asarray(g["gap"], float)))

    t, rs = table(trained), [table(r) for r in randoms]
    common = sorted(set(t).intersection(*[set(r) for r in rs]))
    if not common:
        return np.zeros((0, len(trained["layers"]))), np.zeros((0, len(trained["layers"]))), []
    mean_random = np.mean([[r[i] for i in common] for r in rs], axis=0)
    return np.array([t[i] for i in common]), mean_random, common


def random_init_control(trained: dict[str, Any], randoms: Sequence[dict[str, Any]], seeds: Sequence[int], *,
                        n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Trained-minus-random difference of the same − different gap (and of the substitution gap).

    Args:
        trained: values of the trained model's semantic result; randoms: those of the random-init
            copies (one per seed in `seeds`, the same probe sentences).
    Returns result keys: random_init_seeds, random_init_difference (mean over seeds of each copy's
        paired gap, per layer), random_init_difference_per_seed, trained_minus_random_difference with
        _ci_low/_ci_high (lemmas resampled), _p_value (Wilcoxon signed-rank on per-lemma differences),
        _p_value_holm (across layers), _effect_size (matched rank-biserial), n_lemmas_trained_vs_random;
        the substitution_ counterparts when both sides have substitution items.
    """
    from moescope.analysis.semantic import compare_paired

    if len(randoms) != len(seeds) or not randoms:
        raise ValueError("one random-init result per seed, at least one")
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"random_init_seeds": [int(s) for s in seeds]}
    for prefix, key, ids, diff in (("", "lemma_gaps", "lemmas", "difference"),
                                   ("substitution_", "item_gaps", "items", "substitution_difference")):
        if key not in trained or not all(key in r for r in randoms):
            continue
        per_seed = np.array([np.asarray(r[diff], float) for r in randoms])
        out[f"{prefix}random_init_difference"] = per_seed.mean(0)
        out[f"{prefix}random_init_difference_per_seed"] = per_seed
        x, y, common = _aligned(trained, randoms, key, ids)
        g = compare_paired(x, y, rng, n_boot, confidence)
        stem = f"{prefix}trained_minus_random_"
        out.update({f"{stem}difference": g["diff"], f"{stem}difference_ci_low": g["diff_lo"],
                    f"{stem}difference_ci_high": g["diff_hi"], f"{stem}p_value": g["p"],
                    f"{stem}p_value_holm": g["p_holm"], f"{stem}effect_size": g["effect"]})
        out[f"n_{'items' if prefix else 'lemmas'}_trained_vs_random"] = len(common)
    return out
