"""p-values, multiple comparisons, paired comparisons and confidence intervals."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from moescope.inference.folds import _groups_or_items


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """One-sided permutation p = (1 + #(null >= observed)) / (1 + n); never 0."""
    null = np.asarray(null, dtype=float)
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def sequential_permutation_p(observed: float, null_batches: Iterable[np.ndarray], *, max_draws: int,
                             exceedances: int = 10) -> tuple[float, int]:
    """Besag & Clifford's (1991) sequential Monte-Carlo p-value: draws are taken from
    `null_batches` in order until `exceedances` of them reach the observed value (null >=
    observed), then p = exceedances / draws used; if fewer than that many reach it within
    `max_draws`, p = (1 + #reached) / (1 + max_draws), the ordinary permutation p. Valid like
    the fixed-n test (P(p <= a) <= a under the null), but a null effect stops after about
    exceedances / p draws while a real one can reach the floor 1 / (1 + max_draws).
    Returns (p, draws used)."""
    seen = reached = 0
    for batch in null_batches:
        batch = np.asarray(batch, dtype=float)[:max_draws - seen]
        if not len(batch):  # the source has run dry
            break
        hits = np.cumsum(batch >= observed - 1e-12) + reached
        if hits[-1] >= exceedances:
            used = seen + int(np.argmax(hits >= exceedances)) + 1
            return exceedances / used, used
        seen += len(batch)
        reached = int(hits[-1])
        if seen >= max_draws:
            break
    return (1 + reached) / (1 + seen), seen


def holm_ready_draws(n_tests: int, level: float = 0.01, minimum: int = 0) -> int:
    """Random draws (shuffles, simulated nulls) a Monte-Carlo p needs so that the smallest of
    `n_tests` Holm-adjusted p-values can reach `level`: n_tests / level - 1 (the floor of each
    p is 1 / (draws + 1), Holm multiplies the smallest by n_tests), at least `minimum`."""
    return max(int(minimum), int(np.ceil(n_tests / level - 1e-9)) - 1)


def permutation_floor(n: int) -> float:
    """The smallest p-value `n` permutations can give: 1 / (n + 1)."""
    return 1.0 / (n + 1)


def format_p(p: float | None, n_permutations: int | None = None) -> str:
    """'p = 0.012', or 'p ≤ 0.005' when p sits at the floor 1/(n+1) of n permutations."""
    if p is None or not np.isfinite(p):
        return "p = n/a"
    if n_permutations and p <= permutation_floor(n_permutations) + 1e-12:
        return f"p ≤ {permutation_floor(n_permutations):.2g}"
    return f"p = {p:.2g}" if p >= 0.001 else f"p = {p:.1e}"


# -- multiple comparisons, CIs, paired tests -------------------------------------------------------
def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def corrected_resampled_t(values: Sequence[float], n_train: float, n_test: float, level: float = 0.95) -> dict[str, Any]:
    """Mean of per-fold values from repeated K-fold CV with a CI and a two-sided p (H0: mean 0)
    from the corrected resampled t-test (Nadeau & Bengio 2003): variance inflated by
    (1/J + n_test/n_train) for J fold values, J - 1 degrees of freedom.

    Returns mean, ci_low, ci_high, p_value, se and note (None, or why p is not a t-test p).
    A single value gives NaN for everything but the mean.

    Identical fold values (zero variance) make t undefined (0/0 or x/0), and no p is given for them:
    when they differ from 0 the CI is the point [mean, mean] and p_value is NaN (null in
    results.json) with a note. An "infinite t" would claim p = 0, which no finite number of
    overlapping folds can show; an exact sign test over the folds is no way out either, because
    it assumes independent folds, and the folds of repeated CV share training (and, across
    repeats, test) items, the very dependence the correction exists for. Identical values of 0
    (e.g. two classifiers right on the same items of every fold) give p = 1: no evidence of a
    difference. Either way the note says so; read the fold values or add test items.
    """
    from scipy import stats

    v = np.asarray(values, dtype=float)
    J = len(v)
    mean = float(v.mean()) if J else float("nan")
    nan = float("nan")
    if J < 2:
        return {"mean": mean, "ci_low": nan, "ci_high": nan, "p_value": nan, "se": nan, "note": None}
    # Identical up to rounding (differences of fold accuracies such as 0.8 - 0.7 differ in the
    # last bits): a variance made of rounding error would give a t of 1e15, not evidence.
    if np.ptp(v) <= 1e-12 * max(1.0, float(np.abs(v).max())):
        v = np.full(J, mean)
    se = float(np.sqrt((1.0 / J + n_test / max(n_train, 1e-12)) * v.var(ddof=1)))
    if se == 0:
        if mean == 0:
            return {"mean": mean, "ci_low": mean, "ci_high": mean, "p_value": 1.0, "se": 0.0,
                    "note": f"all {J} fold values are 0: no difference in any fold (p = 1, no t-test)"}
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "p_value": nan, "se": 0.0,
                "note": f"all {J} fold values equal {mean:.6g}: zero variance leaves the corrected t undefined, so no "
                        "p is given (read the fold values; more test items per fold give a testable spread)"}
    q = float(stats.t.ppf(0.5 + level / 2, J - 1))
    p = float(2 * stats.t.sf(abs(mean) / se, J - 1))
    return {"mean": mean, "ci_low": mean - q * se, "ci_high": mean + q * se, "p_value": p, "se": se, "note": None}


def paired_comparison(fold_a: Sequence[float], fold_b: Sequence[float], n_train: float, n_test: float,
                      level: float = 0.95) -> dict[str, Any]:
    """A minus B on the same folds: difference of mean per-fold scores, corrected resampled t CI
    and two-sided p (see :func:`corrected_resampled_t`, also for the zero-variance case where p is
    NaN). Keys: difference, ci_low, ci_high, p_value, note."""
    d = np.asarray(fold_a, dtype=float) - np.asarray(fold_b, dtype=float)
    r = corrected_resampled_t(d, n_train, n_test, level)
    return {"difference": r["mean"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_value": r["p_value"],
            "note": r["note"]}


def cluster_bootstrap_ci(values: np.ndarray, groups: np.ndarray | None, *, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, float]:
    """Percentile CI of the mean of `values` resampling whole groups with replacement (each item
    its own group when `groups` is None). Returns mean, ci_low, ci_high."""
    v = np.asarray(values, dtype=float)
    g = _groups_or_items(groups, len(v))
    G = int(g.max()) + 1 if len(g) else 0
    sums, counts = np.bincount(g, weights=v, minlength=G), np.bincount(g, minlength=G).astype(float)
    rng = np.random.default_rng(seed)
    W = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(float)
    boot = (W @ sums) / np.maximum(W @ counts, 1e-12)
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float] | None = None) -> dict[str, float]:
    """Paired two-sided Wilcoxon signed-rank test of a - b (or of a against 0). Returns
    median_difference, statistic, p_value and the matched-pairs rank-biserial correlation
    (effect in [-1, 1]: share of rank mass favouring a minus that favouring b)."""
    from scipy.stats import rankdata, wilcoxon

    d = np.asarray(a, dtype=float) - (0.0 if b is None else np.asarray(b, dtype=float))
    nz = d[d != 0]
    if len(nz) == 0:
        return {"median_difference": 0.0, "statistic": 0.0, "p_value": 1.0, "rank_biserial": 0.0}
    ranks = rankdata(np.abs(nz))
    rb = float((ranks[nz > 0].sum() - ranks[nz < 0].sum()) / ranks.sum())
    res = wilcoxon(nz)
    return {"median_difference": float(np.median(d)), "statistic": float(res.statistic), "p_value": float(res.pvalue),
            "rank_biserial": rb}


def cluster_bootstrap_ratio_ci(sums: np.ndarray, counts: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                               level: float = 0.95) -> dict[str, Any]:
    """Percentile CI of sum(sums) / sum(counts), resampling whole groups with replacement, from
    per-group totals only (so counts summed over shards suffice: no per-item values needed).

    sums, counts: (G,) or (G, C) per-group totals (C columns, e.g. layers, each get their own
    interval, resampled with the same groups). Returns ratio, ci_low, ci_high (floats, or
    lists for 2-D input); a ratio whose count is 0 is NaN.
    """
    s, c = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    flat = s.ndim == 1
    s, c = np.atleast_2d(s.T).T, np.atleast_2d(c.T).T  # (G, C)
    G = s.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = s.sum(axis=0) / c.sum(axis=0)
        if G == 0:
            lo = hi = np.full(s.shape[1], np.nan)
        else:
            W = np.random.default_rng(seed).multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(float)
            boot = (W @ s) / (W @ c)  # (n_boot, C); NaN where a resample has no items of a column
            lo = np.full(s.shape[1], np.nan)
            hi = np.full(s.shape[1], np.nan)
            some = ~np.isnan(boot).all(axis=0)
            if some.any():
                lo[some], hi[some] = np.nanpercentile(boot[:, some], [50 * (1 - level), 50 * (1 + level)], axis=0)
    pick = (lambda a: float(a[0])) if flat else (lambda a: [float(x) for x in a])  # noqa: E731
    return {"ratio": pick(ratio), "ci_low": pick(lo), "ci_high": pick(hi)}
