"""Cross-validation folds and label permutations that respect the data's groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

Split = tuple[np.ndarray, np.ndarray]


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
