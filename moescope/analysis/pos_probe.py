"""The POS probe and its baselines, cross-validated by sentence with the shared inference module.

Why grouped by sentence: the tokens of one sentence share context (and a trained router sees
that context), so a token-level split puts pieces of a sentence in both train and test. Folds
come from :func:`moescope.inference.repeated_grouped_splits` (stratified, grouped, repeated).
The inner tuning mirrors the outer split: leave-one-sentence-out within each training fold when
the folds are grouped by sentence, leave-one-token-out in token mode (``cv_groups="token"``),
because the penalty should be the one that is best for the generalisation the outer folds
measure. Tuned by sentence under token-level folds, it would be chosen for a harder task than
the one scored (new sentences instead of new tokens of seen sentences) and over-shrink.

Predictors, all evaluated on the same folds:

- **probe**: ridge classifier on the multi-hot routing path, its penalty tuned inside each
  training fold by exact leave-one-sentence-out error (:func:`moescope.inference.ridge_cv`);
  the probes on tags permuted among occurrences of the same token id within each test fold (the
  token-identity null, :func:`moescope.analysis.pos_null.token_identity_fold_permutations`) go
  through the identical procedure, each tuned on its own, and give the probe's permutation p:
  whether routing knows more of the tag than the token id it encodes.
- **word form** (the paper's baseline): each token id's most frequent tag in the training
  folds; ids not seen there get the training folds' majority tag. Reported on all test tokens
  and separately on tokens whose id was seen / not seen in the training folds, as the probe is:
  a fallback to the majority tag on unseen ids is not a property of word form.
- **word level**: the same rule keyed by the whole word (the token ids of the word the token
  belongs to), so every subword of a word gets the word's most frequent tag.
- **majority**: the training folds' most frequent tag.

The baselines are counting rules with nothing to tune; the probe and every probe variant
(shuffled tags, layer ablation) are tuned the same way. Probe minus word form is a paired
comparison on the same folds (:func:`moescope.inference.paired_comparison`: corrected
resampled t over the repeats × folds, difference, 95% CI, two-sided p).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from moescope.analysis.pos_null import token_identity_fold_permutations
from moescope.inference import corrected_resampled_t, paired_comparison, repeated_grouped_splits, ridge_cv

__all__ = ["cv_splits", "lookup_baseline", "probe_and_baselines", "word_keys"]


def word_keys(seq_id: np.ndarray, word: np.ndarray | None, token_ids: np.ndarray) -> np.ndarray:
    """A key per token identifying its whole word's form: the tuple of the word's token ids
    (hashed to int64); tokens without a word index keep their token id as their word."""
    if word is None:
        return token_ids.astype(np.int64)
    from collections import defaultdict

    pieces: dict[tuple[int, int], list[int]] = defaultdict(list)
    for s, w, t in zip(seq_id.tolist(), word.tolist(), token_ids.tolist()):
        pieces[(s, w)].append(t)
    form = {k: hash(tuple(v)) for k, v in pieces.items()}
    return np.array([form[(s, w)] if w >= 0 else -1 - t for s, w, t in zip(seq_id.tolist(), word.tolist(),
                                                                            token_ids.tolist())], dtype=np.int64)


def cv_splits(y: np.ndarray, seq_id: np.ndarray, *, folds: int, repeats: int, seed: int, grouped: bool) -> list:
    """Repeated stratified K-fold splits, grouped by sentence when `grouped`."""
    return repeated_grouped_splits(y, seq_id if grouped else None, folds=folds, repeats=repeats, seed=seed)


def lookup_baseline(keys: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                    n_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, seen) on `test`: each key's most frequent tag in `train` (ties: the tag more
    frequent overall, tags being indexed by descending frequency); unseen keys: the majority tag."""
    majority = int(np.argmax(np.bincount(y[train], minlength=n_tags)))
    ids, inv = np.unique(keys[train], return_inverse=True)
    counts = np.bincount(inv.ravel() * n_tags + y[train], minlength=len(ids) * n_tags).reshape(len(ids), n_tags)
    best = counts.argmax(axis=1)
    at = np.minimum(np.searchsorted(ids, keys[test]), len(ids) - 1)
    seen = ids[at] == keys[test]
    return np.where(seen, best[at], majority), seen


def _accuracy(pred: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    return float(np.mean(pred[mask] == y[mask])) if mask.any() else float("nan")


def probe_and_baselines(X: Any, y: np.ndarray, token_ids: np.ndarray, words: np.ndarray, seq_id: np.ndarray,
                        splits: list, *, n_tags: int, n_shuffles: int, seed: int,
                        grouped: bool = True) -> dict[str, Any]:
    """Probe (nested-tuned ridge), word-form / word-level / majority baselines on the same splits.

    `grouped`: the splits are grouped by sentence (the inner tuning then leaves out one sentence,
    else one token).

    Returns accuracies (fractions of tokens, mean over repeats of the pooled out-of-fold accuracy),
    their corrected-t 95% CIs, seen / unseen accuracies, the paired probe − word form test, the
    accuracy of the probe on tags permuted within token ids (`token_null_probe_accuracy`, first repeat) and
    the probe's permutation p against it (`probe_token_null` holds the probe's accuracy in that repeat), the pooled predictions of the first repeat (for F1 and the
    confusion matrix), the seen mask of that repeat, and per-fold accuracies.
    """
    # Tags permuted among occurrences of one token id within each test fold (the folds keep their
    # tag balance and every id its tag mix; see token_identity_fold_permutations for why).
    # ... in the first repeat only (as every analysis's permutation test): the p compares that repeat's
    # accuracy with the same statistic of each permuted set, at a third of the cost of all repeats.
    permuted = (token_identity_fold_permutations(y, token_ids, splits[:1], n_shuffles, seed=seed + 3) if n_shuffles
                else None)
    cv = ridge_cv(X, y, splits, groups=seq_id if grouped else None, permuted_labels=permuted)
    probe_pred = cv.classes[cv.predictions[:, 0, :]]  # (R, S) tag indices
    R, K = len(splits), len(splits[0])
    wf_pred, wl_pred, maj_pred = (np.empty((R, len(y)), np.int64) for _ in range(3))
    seen = np.zeros((R, len(y)), bool)
    folds = {name: np.empty((R, K)) for name in ("probe", "word_form", "word_level", "majority")}
    for r, rep in enumerate(splits):
        for k, (train, test) in enumerate(rep):
            wf_pred[r, test], seen[r, test] = lookup_baseline(token_ids, y, train, test, n_tags)
            wl_pred[r, test], _ = lookup_baseline(words, y, train, test, n_tags)
            maj_pred[r, test] = int(np.argmax(np.bincount(y[train], minlength=n_tags)))
            for name, pred in (("probe", probe_pred), ("word_form", wf_pred), ("word_level", wl_pred),
                               ("majority", maj_pred)):
                folds[name][r, k] = float(np.mean(pred[r, test] == y[test]))
    n_train, n_test = cv.n_train, cv.n_test
    out: dict[str, Any] = {}
    for name, pred in (("probe", probe_pred), ("word_form", wf_pred), ("word_level", wl_pred), ("majority", maj_pred)):
        acc = np.mean(pred == y[None, :], axis=1)  # per repeat, pooled over folds
        ci = corrected_resampled_t(folds[name].ravel(), n_train, n_test)
        out[f"{name}_accuracy"] = float(acc.mean())
        out[f"{name}_accuracy_ci"] = [ci["ci_low"], ci["ci_high"]]
        out[f"{name}_accuracy_folds"] = folds[name].ravel()
        if name in ("probe", "word_form"):
            out[f"{name}_accuracy_seen"] = float(np.mean([_accuracy(pred[r], y, seen[r]) for r in range(R)]))
            out[f"{name}_accuracy_unseen"] = float(np.nanmean([_accuracy(pred[r], y, ~seen[r]) for r in range(R)])
                                                   if (~seen).any() else np.nan)
    test = paired_comparison(folds["probe"].ravel(), folds["word_form"].ravel(), n_train, n_test)
    out["probe_minus_word_form"] = test
    out["probe_minus_word_level"] = paired_comparison(folds["probe"].ravel(), folds["word_level"].ravel(), n_train,
                                                      n_test)
    out["unseen_token_share"] = float((~seen).mean())
    out["token_null_probe_accuracy"] = float(cv.null_accuracy.mean()) if n_shuffles else float("nan")
    out["probe_p_value_token_null"] = cv.p_value
    out["probe_token_null"] = {
        "permutations": int(n_shuffles), "p_floor": 1.0 / (n_shuffles + 1) if n_shuffles else None,
        "repeats": 1, "probe_accuracy": cv.tested_accuracy,
        "method": "probe retrained (same folds, same nested tuning) on tags permuted among occurrences of the same "
                  "token id within each test fold, in the first CV repeat; one-sided p = (1 + #null >= the probe's "
                  "accuracy in that repeat) / (1 + permutations)"}
    out["alpha_factors_chosen"] = sorted({float(a) for a in cv.alpha_factor.ravel()})
    out["_pred"], out["_wf_pred"], out["_seen"] = probe_pred[0], wf_pred[0], seen[0]
    return out


def ablation_accuracy(X: Any, y: np.ndarray, seq_id: np.ndarray, splits: list, grouped: bool = True) -> dict[str, Any]:
    """Accuracy (mean over repeats) and its corrected-t 95% CI of the probe on other features, same splits
    and the same inner tuning (by sentence when `grouped`, else by token)."""
    cv = ridge_cv(X, y, splits, groups=seq_id if grouped else None)
    ci = cv.ci()
    return {"accuracy": cv.accuracy, "ci": [ci["ci_low"], ci["ci_high"]]}
