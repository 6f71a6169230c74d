"""Shared statistical inference for every analysis: one home for folds, tuning, tests and CIs.

A small package: :mod:`.folds` (splits and permutations), :mod:`.significance` (p-values, Holm,
paired comparisons, CIs), :mod:`.ridge` (the classifier), :mod:`.ridge_pspace` (its fold fit
when items far outnumber features) and :mod:`.ridge_sparse` (its fold basis for sparse features
wider than the fold); everything public is importable from here.

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
  ((1 + #null >= observed) / (1 + n)), :func:`sequential_permutation_p` (Besag-Clifford: stops
  once enough shuffles reach the observed value, so only real effects pay for many shuffles) and
  :func:`format_p` (states the floor as "p ≤ 1/(n+1)").
- :func:`holm`: Holm step-down adjusted p-values across layers / cells.
- :func:`cluster_bootstrap_ci`: percentile CI of a mean resampling whole groups.
- :func:`wilcoxon_signed_rank`: paired Wilcoxon test with the matched-pairs rank-biserial effect.

All functions are pure (numpy in, numpy/dicts out) and seeded; none reads a trace.
"""
from __future__ import annotations
from moescope.inference.folds import (PermutedLabels, Split, code_type, fold_permutations, group_permutations,
                                      repeated_grouped_splits, usable_folds)
from moescope.inference.ridge import (ALPHA_FACTORS, KEEP_PREDICTIONS_MAX, CVResult, Features, default_jobs, ridge_cv,
                                      standardise, thread_map)
from moescope.inference.significance import (cluster_bootstrap_ci, cluster_bootstrap_ratio_ci, corrected_resampled_t,
                                             format_p, holm, holm_ready_draws, paired_comparison, permutation_floor,
                                             permutation_p_value, sequential_permutation_p, wilcoxon_signed_rank)

__all__ = ["ALPHA_FACTORS", "KEEP_PREDICTIONS_MAX", "CVResult", "Features", "PermutedLabels", "Split",
           "cluster_bootstrap_ci", "cluster_bootstrap_ratio_ci", "code_type", "corrected_resampled_t", "default_jobs",
           "fold_permutations", "format_p", "group_permutations", "holm", "holm_ready_draws", "paired_comparison",
           "permutation_floor",
           "permutation_p_value", "repeated_grouped_splits", "ridge_cv", "sequential_permutation_p", "standardise",
           "thread_map", "usable_folds", "wilcoxon_signed_rank"]
