"""The classifier every analysis shares: ridge with nested leave-one-group-out tuning, repeated
grouped CV and label permutations through the identical procedure."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from moescope.inference.folds import PermutedLabels, Split, _groups_or_items, code_type
from moescope.inference.significance import corrected_resampled_t, permutation_p_value

#: Ridge penalties tried by the nested tuning, as multiples of the mean squared singular value of
#: the (standardised, centred) training features: from nearly unregularised to heavily shrunk.
ALPHA_FACTORS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

#: ridge_cv keeps every label set's out-of-fold predictions up to this many (repeats x sets x
#: items; 1 byte each for up to 127 classes), else only the real labels' and the null accuracies.
KEEP_PREDICTIONS_MAX = 1 << 24
Features = Any  # (S, p) array, scipy sparse matrix, or callable(split_index, train_idx, test_idx) -> (X_train, X_test)


def default_jobs() -> int:
    """Threads for the analyses' parallel parts when the user does not say: one per core this
    process may use, at most 8 (the folds are small; more threads only contend)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def thread_map(fn: Callable[..., Any], args: Iterable[Any], n_jobs: int = 1) -> list[Any]:
    """[fn(a) for a in args], on `n_jobs` threads when n_jobs != 1 (numpy and BLAS release the GIL,
    so the analyses' numeric loops run in parallel), in the order of `args` either way."""
    args = list(args)
    if n_jobs == 1 or len(args) < 2:
        return [fn(a) for a in args]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=n_jobs, prefer="threads")(delayed(fn)(a) for a in args)


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
    return _fit_fold_basis(_basis(Z, Zte), T, g_train, n_sets, factors)


def _fit_fold_basis(basis: tuple[np.ndarray, np.ndarray, np.ndarray], T: np.ndarray, g_train: np.ndarray,
                    n_sets: int, factors: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """_fit_fold from the training fold's basis (U, s, A) (:func:`_basis`, or
    moescope.inference.ridge_sparse.sparse_dual_basis for sparse features)."""
    U, s, A = basis
    n = len(U)
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
    scores = np.empty((len(A), M))
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
    (moescope.inference.ridge_pspace; equal to the direct fit up to rounding), so neither the n x p
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
        from moescope.inference import ridge_pspace, ridge_sparse

        tr, te = split
        sets = label_sets(j // K, tr)
        # n >> p (or features built on demand): the fold is fitted from p x p sums over blocks of
        # rows, without copying the training rows (moescope.inference.ridge_pspace)
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
        if ridge_sparse.sparse_dual_wanted(Xtr, len(tr)):
            # sparse, wider than long (a bag of token ids): the n x n Gram from sparse products
            basis = ridge_sparse.sparse_dual_basis(Xtr, Xte, standardize=standardize)
            scores, best = _fit_fold_basis(basis, onehot(sets), g_all[tr], len(sets), alpha_factors)
            return te, scores.reshape(len(te), len(sets), C).argmax(axis=2).T.astype(codes), best
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
    results = thread_map(lambda item: one(*item), enumerate(flat), n_jobs)
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
