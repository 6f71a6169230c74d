"""Per-layer permutation p-values of the routing signatures, with enough shuffles to survive Holm.

Each MoE layer's signature (its E features) goes through the classifier on the same label
shuffles as the all-layer signature. With n shuffles and L layers the smallest Holm-adjusted p
is L / (n + 1): 200 shuffles can never make a layer of a 16-layer model significant at 0.05.
Running thousands of shuffles for every layer would multiply the cost of the whole analysis,
so each layer's p is Besag & Clifford's sequential Monte-Carlo p-value
(:func:`moescope.inference.sequential_permutation_p`): a layer stops drawing shuffles once 10 of
them reach its accuracy (a layer without an effect stops within the first batch), and only a
layer whose accuracy the shuffles rarely reach goes on, batch by batch, up to a budget that
lets it reach p <= 0.01 after the Holm correction.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from moescope import inference as inf

#: Shuffles that must reach a layer's accuracy before its sequential test stops.
EXCEEDANCES = 10
#: Shuffles per extra batch (each batch refits the layer's classifier on the first CV repeat).
BATCH = 200
#: Seed offset of the extra batches (the first `permutations` shuffles are the shared ones).
_SEED_STRIDE = 104_729


def layer_permutation_budget(permutations: int, requested: int | None, n_layers: int, level: float = 0.01) -> int:
    """Shuffles a layer may draw: `requested` when given, else enough for a Holm-adjusted p of
    `level` across `n_layers` (L / level - 1), never fewer than the shared `permutations`;
    0 when there are no shuffles at all."""
    if permutations <= 0:
        return 0
    if requested is not None:
        return max(int(requested), permutations)
    return inf.holm_ready_draws(n_layers, level, minimum=permutations)


def layer_p_value(Xi: Any, first: inf.CVResult, y: np.ndarray, splits: list, groups: np.ndarray | None, *,
                  max_draws: int, seed: int, n_jobs: int, permuted_repeats: int = 1) -> tuple[float | None, int]:
    """(sequential permutation p, shuffles drawn) of one layer. Xi: the layer's (S, E) features;
    `first`: their ridge_cv with the shared shuffles on the first `permuted_repeats` CV repeats
    (its null accuracies are the first draws, its tested_accuracy the observed value). Further
    shuffles go through the same repeats in batches, from seeds that depend only on the batch:
    every layer sees the same ones, regenerated per layer rather than held (a batch is 200 x S)."""
    if max_draws <= 0 or not len(first.null_accuracy):
        return None, 0
    tested = splits[:permuted_repeats]

    def null_batches() -> Iterator[np.ndarray]:
        yield first.null_accuracy
        batch = 0
        while True:
            batch += 1
            extra = inf.fold_permutations(y, groups, tested, BATCH, seed=seed + 7919 + _SEED_STRIDE * batch,
                                          as_codes=True)
            yield inf.ridge_cv(Xi, y, tested, groups=groups, permuted_labels=extra, n_jobs=n_jobs).null_accuracy

    return inf.sequential_permutation_p(first.tested_accuracy, null_batches(), max_draws=max_draws,
                                        exceedances=EXCEEDANCES)
