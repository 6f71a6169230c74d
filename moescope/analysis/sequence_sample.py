"""A seeded sample of a trace's sequences, stratified by label, that keeps groups whole.

Signatures of a corpus-scale trace need not use every sequence: ``--max-sequences N`` counts
and classifies a sample of about N. The sample
- keeps each label's share (proportional allocation, at least 2 sequences a label, so every
  label can sit in a training and a test fold), and
- takes whole groups (e.g. all pieces of one document): sampling pieces would leave a
  document's other pieces out at random but never split it, and grouped CV stays valid.
Within a label, groups are taken in a seeded random order until the label's quota is reached
(the last group may overshoot it: a group is never cut).
"""
from __future__ import annotations

import numpy as np


def sample_sequences(seq_ids: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, max_sequences: int,
                     seed: int = 0) -> np.ndarray:
    """Sorted seq_ids of a label-stratified, group-whole sample of about `max_sequences`.

    Args:
        seq_ids: (S,) sequence ids; labels: (S,) their labels; groups: (S,) their groups
            (None: every sequence is its own group).
        max_sequences: target size; all sequences when there are no more than that.
        seed: the sample's seed (the same seed gives the same sample).
    Returns:
        (n,) int64 seq_ids, ascending; n is max_sequences, give or take the last group of each label.
    """
    seq_ids = np.asarray(seq_ids, np.int64)
    if max_sequences < 1:
        raise ValueError(f"max_sequences must be at least 1, not {max_sequences}")
    if len(seq_ids) <= max_sequences:
        return np.sort(seq_ids)
    labels = np.asarray(labels).astype(str)
    groups = np.asarray(groups).astype(str) if groups is not None else seq_ids.astype(str)
    rng = np.random.default_rng(seed)
    names, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(np.rint(counts * max_sequences / len(seq_ids)).astype(np.int64), np.minimum(counts, 2))
    chosen: list[np.ndarray] = []
    for name, want in zip(names, quota):
        in_label = labels == name
        label_groups, sizes = np.unique(groups[in_label], return_counts=True)
        order = rng.permutation(len(label_groups))
        taken = np.cumsum(sizes[order])
        n_groups = int(np.searchsorted(taken, want, side="left")) + 1  # groups until the quota is reached
        keep = label_groups[order[:n_groups]]
        chosen.append(seq_ids[in_label & np.isin(groups, keep)])
    return np.sort(np.concatenate(chosen))
