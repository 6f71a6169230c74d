"""Shared statistical inference for every analysis: one home for folds, tuning, tests and CIs.

What lives here (and nowhere else: analyses call these instead of keeping their own copies):

- :func:`repeated_grouped_splits`: repeated stratified *grouped* K-fold splits (a group, e.g.
  one document's pieces, is never split between train and test), a fresh shuffle per repeat.
- :func:`ridge_cv`: a linear classifier (one-vs-rest ridge on one-hot targets, features
  standardised inside each training fold) whose regularisation strength is tuned *inside*
  every training fold by exact leave-one-group-out error (closed form for ridge: one
  factorisation per outer fold serves the whole alpha grid, the inner CV and any number of
  label permutations at once). Features may be fitted per fold (a callable).
- :func:`corrected_resampled_t`: mean, 95% CI and p of per-fold values of repeated CV with the
  Nadeau-Bengio correction for overlapping training sets; :func:`paired_comparison` applies it
  to the per-fold difference of two feature sets evaluated on the same folds. (No McNemar test
  on pooled out-of-fold predictions: it treats items as independent, which tokens of one
  sentence or pieces of one document are not, and ignores the variation between training folds.)
- :func:`group_permutations` (labels shuffled at the group level), :func:`fold_permutations`
  (the same within each test fold: the null of a cross-validated score), :func:`permutation_p_value`
  ((1 + #null >= observed) / (1 + n)) and :func:`format_p` (states the floor as "p ≤ 1/(n+1)").
- :func:`holm`: Holm step-down adjusted p-values across layers / cells.
- :func:`cluster_bootstrap_ci`: percentile CI of a mean resampling whole groups.
- :func:`wilcoxon_signed_rank`: paired Wilcoxon test with the matched-pairs rank-biserial effect.

All functions are pure (numpy in, numpy/dicts out) and seeded; none reads a trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

#: Ridge penalties tried by the nested tuning, as multiples of the mean squared singular value of
#: the (standardised, centred) training features: from nearly unregularised to heavily shrunk.
ALPHA_FACTORS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

Split = tuple[np.ndarray, np.ndarray]
#: ridge_cv keeps every label set's out-of-fold predictions up to this many (repeats x sets x
#: items; 1 byte each for up to 127 classes), else only the real labels' and the null accuracies.
KEEP_PREDICTIONS_MAX = 1 << 24
Features = Any  # (S, p) array, scipy sparse matrix, or callable(split_index, train_idx, test_idx) -> (X_train, X_test)


# -- folds -----------------------------------------------------------------------------------------
def _groups_or_items(groups: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """Integer group codes (each item its own group when `groups` is None)."""
    if groups is None:
        return np.arange(n)
    return np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].reshape(-1)


def usable_folds(y: np.ndarray, groups: np.ndarray | None, folds: int) -> int:
    """The number of folds that can be used: at most the number of distinct groups holding the
    rarest label (a label in fewer groups than folds cannot appear in every training fold)."""
    g = _groups_or_items(groups, len(y))
    per_label = [len(np.unique(g[np.asarray(y) == c])) for c in np.unique(y)]
    return int(max(0, min(folds, min(per_label), len(np.unique(g)))))


def repeated_grouped_splits(y: np.ndarray, groups: np.ndarray | None = None, *, folds: int = 5, repeats: int = 5,
                            seed: int = 0) -> list[list[Split]]:
    """`repeats` x `folds` (train, test) index pairs: stratified K-fold, grouped when `groups` is
    given (sklearn StratifiedGroupKFold: all items of a group land in the same test fold), shuffled
    with seed + repeat. Returns a list per repeat of `folds` splits. ValueError when folds < 2."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    y = np.asarray(y)
    out = []
    for r in range(repeats):
        if groups is None:
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed + r)
            splits = cv.split(np.zeros(len(y)), y)
        else:
            cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed + r)
            splits = cv.split(np.zeros(len(y)), y, _groups_or_items(groups, len(y)))
        out.append([(np.asarray(tr), np.asarray(te)) for tr, te in splits])
    return out


# -- permutations ----------------------------------------------------------------------------------
def group_permutations(y: np.ndarray, groups: np.ndarray | None, n: int, seed: int = 0) -> np.ndarray:
    """(n, S) label vectors shuffled at the group level. When every group carries one label, the
    groups' labels are permuted among all groups (a group keeps one label, as in the data); when
    some group mixes labels, whole label blocks are exchanged among groups of equal size. Without
    groups, items are permuted freely."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    if n <= 0:
        return np.empty((0, len(y)), dtype=y.dtype)
    g = _groups_or_items(groups, len(y))
    order = np.argsort(g, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(g[order])) + 1]
    sizes = np.diff(np.r_[starts, len(y)])
    first = order[starts]
    constant = bool(np.all(y[order] == np.repeat(y[first], sizes)))
    out = np.empty((n, len(y)), dtype=y.dtype)
    for i in range(n):
        if constant:
            out[i] = rng.permutation(y[first])[g]
            continue
        perm = np.arange(len(sizes))
        for size in np.unique(sizes):
            same = np.flatnonzero(sizes == size)
            perm[same] = rng.permutation(same)
        # group j receives the label block of group perm[j] (same size, same within-group order)
        src = np.concatenate([order[starts[p]:starts[p] + sizes[p]] for p in perm])
        out[i, order] = y[src]
    return out


@dataclass
class PermutedLabels:
    """Permuted label sets kept as small integer codes: codes[..., i] indexes `classes`
    (np.asarray gives the labels themselves). 250,000 sequences x 200 permutations x 5 repeats
    are 250 MB as int8 codes, 6 GB as 6-character labels."""

    classes: np.ndarray
    codes: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.classes[self.codes]
        return out if dtype is None else out.astype(dtype)


def code_type(n_classes: int) -> np.dtype:
    """The narrowest signed integer type holding class indices 0..n_classes-1."""
    return np.dtype(np.int8 if n_classes <= 127 else np.int16 if n_classes <= 32767 else np.int64)


def fold_permutations(y: np.ndarray, groups: np.ndarray | None, splits: list[list[Split]], n: int,
                      seed: int = 0, *, as_codes: bool = False) -> np.ndarray | PermutedLabels:
    """(R, n, S) label vectors for the permutation null of repeated CV: in every repeat, labels
    are shuffled at the group level *within each test fold* (:func:`group_permutations` on the
    fold's items), so each permuted label set has the same label counts per fold as the real
    one. Shuffling over all items instead leaves folds that were stratified on the real labels
    unbalanced for the shuffled ones, which pushes the null below chance (anti-learning) and
    makes the real accuracy look significant when it is not.

    as_codes: return the same shuffles as a :class:`PermutedLabels` (small integer codes;
    ridge_cv takes it as permuted_labels without expanding it)."""
    y = np.asarray(y)
    classes, yi = np.unique(y, return_inverse=True)
    yi = yi.reshape(-1).astype(code_type(len(classes)))
    out = np.empty((len(splits), max(n, 0), len(y)), dtype=yi.dtype)
    for r, rep in enumerate(splits):
        for f, (_, te) in enumerate(rep):
            # the shuffles depend only on positions, so shuffling codes = shuffling the labels
            sub = group_permutations(yi[te], None if groups is None else np.asarray(groups)[te], n,
                                     seed=seed + 1000 * r + f)
            out[r][:, te] = sub
    return PermutedLabels(classes, out) if as_codes else classes[out]


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """One-sided permutation p = (1 + #(null >= observed)) / (1 + n); never 0."""
    null = np.asarray(null, dtype=float)
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


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


def default_jobs() -> int:
    """Threads for the analyses' parallel parts when the user does not say: one per core this
    process may use, at most 8 (the folds are small; more threads only contend)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


# -- the classifier: ridge with nested leave-one-group-out tuning ---------------------------------
@dataclass
class CVResult:
    """Out-of-fold results of :func:`ridge_cv` for the real labels (set 0) and any label
    permutations (sets 1..P), on R repeats x K folds; the permutations run in the first
    `permuted_repeats` repeats (all R by default; the others hold the real labels only).

    predictions: (R, P+1, S) predicted class index (-1 where a repeat has no permutations), or
    (R, 1, S) when ridge_cv kept only the real labels' (above KEEP_PREDICTIONS_MAX);
    fold_accuracy: (R, K, P+1) (NaN there); alpha_factor: (R, K) chosen penalty factor for the
    real labels; classes: label names (index -> name)."""

    predictions: np.ndarray
    fold_accuracy: np.ndarray
    fold_sizes: np.ndarray
    alpha_factor: np.ndarray
    classes: np.ndarray
    y: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def repeat_accuracy(self) -> np.ndarray:
        """(R,) pooled out-of-fold accuracy of each repeat, real labels."""
        return np.mean(self.predictions[:, 0, :] == self.y[None, :], axis=1)

    @property
    def accuracy(self) -> float:
        """Mean over repeats of the pooled out-of-fold accuracy (real labels)."""
        return float(self.repeat_accuracy.mean())

    @property
    def folds(self) -> np.ndarray:
        """(R*K,) per-fold accuracies of the real labels (input of the corrected t)."""
        return self.fold_accuracy[:, :, 0].reshape(-1)

    @property
    def n_test(self) -> float:
        return float(self.fold_sizes.mean())

    @property
    def n_train(self) -> float:
        return float(len(self.y) - self.fold_sizes.mean())

    def ci(self, level: float = 0.95) -> dict[str, float]:
        """Accuracy with the corrected resampled t CI over all R*K folds."""
        return corrected_resampled_t(self.folds, self.n_train, self.n_test, level)

    @property
    def null_accuracy(self) -> np.ndarray:
        """(P,) accuracy (mean over the permuted repeats) of each label permutation."""
        if self._null_accuracy is not None:
            return self._null_accuracy
        Rp = len(self._perm_y)
        perm = self.predictions[:Rp, 1:, :]
        return np.mean(perm == self._perm_y, axis=(0, 2)) if perm.shape[1] else np.zeros(0)

    _perm_y: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), int))
    # null accuracies computed by ridge_cv when it drops the permutation predictions (too large to keep)
    _null_accuracy: np.ndarray | None = None

    @property
    def tested_accuracy(self) -> float:
        """The real labels' accuracy over the repeats that carry permutations: the statistic the
        permutation p compares with its null (the identical statistic for every label set)."""
        return float(self.repeat_accuracy[:max(len(self._perm_y), 1)].mean())

    @property
    def p_value(self) -> float | None:
        """Permutation p of the real accuracy against the label-permutation accuracies (both over
        the same repeats, :attr:`tested_accuracy`)."""
        null = self.null_accuracy
        return permutation_p_value(self.tested_accuracy, null) if len(null) else None

    def pooled_predictions(self, repeat: int = 0) -> np.ndarray:
        """Class names predicted out of fold in one repeat (every item once)."""
        return self.classes[self.predictions[repeat, 0]]


def standardise(X_train: Any, X_test: Any) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale columns by the training rows' mean and sd (sd 0 -> 1); dense float64."""
    Xtr = X_train.toarray() if hasattr(X_train, "toarray") else np.asarray(X_train, dtype=np.float64)
    Xte = X_test.toarray() if hasattr(X_test, "toarray") else np.asarray(X_test, dtype=np.float64)
    mu = Xtr.mean(axis=0)
    sd = Xtr.std(axis=0)
    sd[sd == 0] = 1.0
    return (Xtr - mu) / sd, (Xte - mu) / sd


def _basis(Z: np.ndarray, Zte: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of the centred training features: U (n, r), s (r,), and the test rows projected
    on the right singular vectors (nte, r). Through the n x n Gram matrix when p > n."""
    n, p = Z.shape
    if p > n:
        lam, Q = np.linalg.eigh(Z @ Z.T)
        keep = lam > max(lam.max(initial=0.0), 0.0) * 1e-10
        U, s = Q[:, keep], np.sqrt(lam[keep])
        A = (Zte @ Z.T) @ U / s
    else:
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        keep = s > max(s.max(initial=0.0), 0.0) * 1e-8
        U, s, A = U[:, keep], s[keep], Zte @ Vt[keep].T
    return U, s, A


def _group_index(g: np.ndarray) -> list[np.ndarray]:
    """Groups bucketed by size: a list of (n_groups, size) index arrays."""
    order = np.argsort(g, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(g[order])) + 1]
    sizes = np.diff(np.r_[starts, len(g)])
    out = []
    for size in np.unique(sizes):
        st = starts[sizes == size]
        out.append(order[st[:, None] + np.arange(size)[None, :]])
    return out


def _fit_fold(Z: np.ndarray, Zte: np.ndarray, T: np.ndarray, g_train: np.ndarray, n_sets: int,
              factors: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on one training fold for every label set at once; the penalty of each set chosen by
    its exact leave-one-group-out squared error. Returns (test scores (nte, M), chosen factor index per set)."""
    n = len(Z)
    U, s, A = _basis(Z, Zte)
    tbar = T.mean(axis=0)
    UT = U.T @ (T - tbar)
    s2 = s ** 2
    alphas = np.asarray(factors) * (s2.mean() if len(s2) else 1.0)
    buckets = _group_index(g_train)
    press = np.zeros((len(alphas), n_sets))
    # The inner error is only compared across penalties: float32 products halve the main cost
    # (n x r x M per penalty, M = classes x label sets) at a precision far below the differences.
    U32, UT32, Tc32 = U.astype(np.float32), UT.astype(np.float32), (T - tbar).astype(np.float32)
    H = s2[None, :] / (s2[None, :] + alphas[:, None])  # (penalties, r) shrinkage of each direction
    if all(idx.shape[1] == 1 for idx in buckets):
        # Leave-one-out (every group a single item): e_i = E_i / (1 - h_ii), so the error of a
        # column is the leverage-weighted sum of squared residuals, w @ E**2 with
        # w_i = 1 / (1 - h_ii)**2; the leverages of every penalty come from one product.
        lev = 1.0 / n + (U * U) @ H.T  # (n, penalties)
        w = (1.0 / np.maximum(1.0 - lev, 1e-12) ** 2).astype(np.float32)
        E = np.empty_like(Tc32)
        for ai in range(len(alphas)):
            np.matmul(U32, H[ai][:, None].astype(np.float32) * UT32, out=E)
            np.subtract(Tc32, E, out=E)
            np.square(E, out=E)
            press[ai] = (w[:, ai] @ E).reshape(n_sets, -1).sum(axis=1)
    else:
        for ai in range(len(alphas)):
            h = H[ai]
            E = Tc32 - U32 @ (h[:, None].astype(np.float32) * UT32)
            for idx in buckets:
                if idx.shape[1] == 1:
                    i = idx[:, 0]
                    hii = 1.0 / n + np.einsum("ir,r,ir->i", U[i], h, U[i])
                    e = E[i] / np.maximum(1.0 - hii, 1e-12)[:, None]
                else:
                    Ug = U[idx]  # (G, m, r)
                    Hgg = 1.0 / n + np.einsum("gir,r,gjr->gij", Ug, h, Ug)
                    e = np.linalg.solve(np.eye(idx.shape[1])[None] - Hgg, E[idx])
                    e = e.reshape(-1, E.shape[1])
                press[ai] += np.einsum("ij,ij->j", e, e).reshape(n_sets, -1).sum(axis=1)
    best = np.argmin(press[::-1], axis=0)  # ties -> the stronger penalty
    best = len(alphas) - 1 - best
    M = T.shape[1]
    C = M // n_sets
    scores = np.empty((len(Zte), M))
    for ai in np.unique(best):
        sets = np.flatnonzero(best == ai)
        cols = (sets[:, None] * C + np.arange(C)[None, :]).reshape(-1)
        shrink = s / (s2 + alphas[ai])
        scores[:, cols] = tbar[cols] + A @ (shrink[:, None] * UT[:, cols])
    return scores, best


def ridge_cv(features: Features, y: np.ndarray, splits: list[list[Split]], *, groups: np.ndarray | None = None,
             permuted_labels: np.ndarray | None = None, standardize: bool = True,
             alpha_factors: Sequence[float] = ALPHA_FACTORS, n_jobs: int = 1) -> CVResult:
    """Cross-validated accuracy of a ridge classifier with nested tuning, on the given splits.

    Model: one-vs-rest ridge regression on one-hot labels with an unpenalised intercept,
    predicted label = argmax. Each outer training fold standardises the features on its own rows
    (skip with standardize=False, e.g. for tf-idf) and chooses the penalty from `alpha_factors`
    (times the mean squared singular value of the training features) by the exact
    leave-one-group-out squared error within the training fold (leave-one-out without groups).
    Every label set in `permuted_labels` ((R', P, S) one set of P per repeat for the first
    R' <= R repeats, e.g. :func:`fold_permutations` of ``splits[:R']``, or (P, S) for all
    repeats) goes through the identical procedure on the same folds, tuned on its own; the
    permutation p compares the real labels' accuracy over those R' repeats with the permuted
    sets' (:attr:`CVResult.tested_accuracy`). R' = 1 tests the first repeat's accuracy: a
    valid test at 1/R of the cost, while the accuracy and its CI still use every repeat.
    `permuted_labels` may be a :class:`PermutedLabels` (fold_permutations(..., as_codes=True)).

    Memory: when the training folds have many more rows than features (or the features are a
    moescope.chunked.ChunkedMatrix), each fold is fitted from p x p sums over blocks of rows
    (moescope.ridge_pspace; equal to the direct fit up to rounding), so neither the n x p
    features nor the n x (classes x label sets) targets are ever held whole.

    Args:
        features: (S, p) dense or sparse, or a callable (split_index, train_idx, test_idx) ->
            (X_train, X_test) for features fitted on the training fold (applied before
            standardising); split_index counts the splits repeat by repeat, fold by fold.
        splits: :func:`repeated_grouped_splits` output.
        groups: group of each item for the inner tuning (None: each item alone).
        n_jobs: threads over the outer folds (BLAS releases the GIL).
    """
    y = np.asarray(y)
    classes, yi = np.unique(y, return_inverse=True)
    C = len(classes)
    R = len(splits)
    codes = code_type(C)  # class indices in the narrowest type: (R, sets, S) arrays stay small
    yi = yi.reshape(-1).astype(codes)
    if isinstance(permuted_labels, PermutedLabels):  # codes already: map them to this call's classes
        lut = np.searchsorted(classes, permuted_labels.classes).astype(codes)
        same = permuted_labels.codes.dtype == codes and np.array_equal(lut, np.arange(len(lut)))
        perm_i = permuted_labels.codes if same else lut[permuted_labels.codes]  # no copy when they agree
    else:
        perm = np.asarray(permuted_labels) if permuted_labels is not None else np.zeros((0, len(y)))
        perm_i = np.searchsorted(classes, perm).astype(codes) if perm.size else np.zeros((R, 0, len(y)), codes)
    if perm_i.ndim == 2:
        perm_i = np.broadcast_to(perm_i, (R,) + perm_i.shape)
    if len(perm_i) > R:
        raise ValueError(f"permuted_labels has {len(perm_i)} repeats, the splits {R}")
    Rp = len(perm_i) if perm_i.size else 0  # repeats carrying permutations: the first Rp
    P = perm_i.shape[1]

    def label_sets(r: int, idx: np.ndarray) -> np.ndarray:
        """(n_sets of repeat r, len(idx)) labels of items idx: set 0 the real ones, then the
        repeat's permutations (built per fold, so no (R, n_sets, S) copy is held)."""
        real = yi[idx][None]
        return np.concatenate([real, perm_i[r][:, idx]]) if r < Rp else real

    def onehot(sets: np.ndarray) -> np.ndarray:
        n_sets, n = sets.shape
        out = np.zeros((n, n_sets * C))
        out[np.arange(n)[:, None], np.arange(n_sets)[None, :] * C + sets.T] = 1.0
        return out

    g_all = _groups_or_items(groups, len(y))
    K = len(splits[0]) if splits else 0

    def one(j: int, split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from moescope import ridge_pspace

        tr, te = split
        sets = label_sets(j // K, tr)
        # n >> p (or features built on demand): the fold is fitted from p x p sums over blocks of
        # rows, without copying the training rows (moescope.ridge_pspace)
        if not callable(features) and ridge_pspace.pspace_wanted(features, len(tr)):
            pred, best = ridge_pspace.fit_fold_pspace(features, tr, features, te, sets, C, g_all[tr], alpha_factors,
                                                      standardize)
            return te, pred.astype(codes), best
        if callable(features):
            Xtr, Xte = features(j, tr, te)
            if ridge_pspace.pspace_wanted(Xtr, len(tr)):
                pred, best = ridge_pspace.fit_fold_pspace(Xtr, np.arange(len(tr)), Xte, np.arange(len(te)), sets, C,
                                                          g_all[tr], alpha_factors, standardize)
                return te, pred.astype(codes), best
        else:
            Xtr, Xte = features[tr], features[te]
        if standardize:
            Z, Zte = standardise(Xtr, Xte)
        else:
            Xtr = Xtr.toarray() if hasattr(Xtr, "toarray") else np.asarray(Xtr, dtype=np.float64)
            Xte = Xte.toarray() if hasattr(Xte, "toarray") else np.asarray(Xte, dtype=np.float64)
            mu = Xtr.mean(axis=0)
            Z, Zte = Xtr - mu, Xte - mu
        scores, best = _fit_fold(Z, Zte, onehot(sets), g_all[tr], len(sets), alpha_factors)
        pred = scores.reshape(len(te), len(sets), C).argmax(axis=2).T  # (n_sets, nte)
        return te, pred.astype(codes), best

    flat = [sp for rep in splits for sp in rep]
    if n_jobs != 1 and len(flat) > 1:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(one)(j, sp) for j, sp in enumerate(flat))
    else:
        results = [one(j, sp) for j, sp in enumerate(flat)]
    # every label set's predictions are kept unless that is large (then the null accuracies are
    # kept instead: the same numbers, counted fold by fold)
    keep_all = R * (1 + P) * len(y) <= KEEP_PREDICTIONS_MAX
    predictions = np.full((R, 1 + P if keep_all else 1, len(y)), -1, dtype=codes)
    correct = np.zeros(1 + P, np.int64)
    fold_acc = np.full((R, K, 1 + P), np.nan)
    sizes = np.empty((R, K))
    alpha = np.empty((R, K))
    for j, (te, pred, best) in enumerate(results):
        r, k = divmod(j, K)
        predictions[r][:len(pred) if keep_all else 1, te] = pred if keep_all else pred[:1]
        hits = pred == label_sets(r, te)
        if len(pred) > 1:
            correct += hits.sum(axis=1)
        fold_acc[r, k, :len(pred)] = np.mean(hits, axis=1)
        sizes[r, k] = len(te)
        alpha[r, k] = np.asarray(alpha_factors)[best[0]]
    res = CVResult(predictions, fold_acc, sizes, alpha, classes, yi)
    res._perm_y = perm_i[:Rp]  # a view of the caller's codes (no copy when classes agree)
    if not keep_all:
        res._null_accuracy = correct[1:] / float(max(Rp, 1) * len(y))
        res.notes.append(f"out-of-fold predictions of the {P} label permutations not kept (too many); "
                         "their null accuracies were counted fold by fold")
    return res


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
