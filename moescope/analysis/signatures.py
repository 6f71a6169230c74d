"""Task routing signatures (Avinash 2026) with chance baselines and token-identity controls.

A sequence's signature: for each MoE layer l and expert e, the share of the sequence's
tokens (of the chosen phase) whose top-k at l holds e; L * E values (each layer's block sums
to k). :func:`routing_signatures` asks whether signatures tell the sequences' labels apart,
and how much of that is more than chance, load balance and token identity:

- cosine similarity within vs across labels, Cohen's d;
- a linear classifier (moescope.inference.ridge_cv: penalty tuned inside every training fold)
  under repeated stratified *grouped* K-fold CV (default 5 x 5; folds never split a group such
  as a document): accuracy with a 95% CI (corrected resampled t), macro-F1, confusion matrix;
  per MoE layer (CI, permutation p, Holm across layers); on the first n tokens only;
- label permutation baseline: labels shuffled at the group level, the identical procedure;
- load-balancing control: per layer each expert's total count is kept and the assignments
  are dealt to the sequences at random (see :func:`load_balanced_counts`);
- bag of token ids (tf-idf fitted per training fold) with the same classifier and folds;
- token-id routing control: every token given the k experts its token id gets most often
  at that layer in the training fold (see signature_controls.TokenIdControl), then the same
  classifier. Routing vs each token-identity baseline: paired difference on the same folds
  with CI and p.

docs/analyses/signatures.md defines every number and its baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from moescope import inference as inf
from moescope.analysis.result import AnalysisResult
from moescope.analysis.signature_cosines import cosine_stats
from moescope.analysis.signature_layers import layer_p_value, layer_permutation_budget
from moescope.analysis.signature_matrix import SignatureMatrix
from moescope.analysis.signature_controls import (SequenceTokenExperts, TokenIdControl, bag_cap, load_balanced_counts,
                                                   sequence_token_expert_counts, tfidf_fold_features, token_count_matrix,
                                                   whole_trace_control)
from moescope.analysis.routing_counts import RouteCounts, SequenceCounts, count_routes, sequence_token_counts, trace_phases
from moescope.chunked import ChunkedMatrix, lazy_wanted
from moescope.errors import DataError
from moescope.store.reader import Trace


# -- labels ----------------------------------------------------------------------------------------
def read_labels(trace: Trace, label: str) -> dict[int, str]:
    """seq_id -> label (as text) for every sequence whose `label` field is set. DataError
    naming the available columns when the sequences table lacks the field."""
    columns = trace.columns("sequences") if trace.has("sequences") else []
    if label not in columns:
        fields = [c for c in columns if c not in ("seq_id", "text", "generated_text")]
        raise DataError(f"the sequences of {trace.path} have no field {label!r}; "
                        f"available: {', '.join(fields) or 'none (capture a .jsonl with a label field)'}")
    quoted = '"' + label.replace('"', '""') + '"'
    rows = trace.rows(f"SELECT seq_id, {quoted} FROM sequences WHERE {quoted} IS NOT NULL")
    return {int(s): str(v) for s, v in rows}


def check_labels(labels: np.ndarray, label: str) -> None:
    """DataError unless there are at least 2 labels and each has at least 2 sequences."""
    names, counts = np.unique(labels, return_counts=True)
    if len(names) < 2:
        raise DataError(f"field {label!r} has {len(names)} distinct value(s) among the analysed sequences; "
                        "signatures need at least 2 labels")
    single = names[counts < 2]
    if len(single):
        raise DataError(f"label(s) {', '.join(map(repr, single.tolist()))} of field {label!r} have a single sequence; "
                        "add sequences or drop that label (cross-validation needs 2 per label)")


# -- signature vectors and their geometry ----------------------------------------------------------
def signature_vectors(counts: np.ndarray, n_tokens: np.ndarray) -> np.ndarray | SignatureMatrix:
    """(S, L * E) float64: counts (S, L, E) over tokens n_tokens (S, L); 0 where a layer saw no token.
    Above moescope.chunked.LAZY_CELLS cells: a :class:`SignatureMatrix` with the same values,
    built a block of rows at a time (the classifier and cosine_stats read it so)."""
    if lazy_wanted(counts.shape[0], counts.shape[1] * counts.shape[2]):
        return SignatureMatrix(counts, n_tokens)
    n = np.asarray(n_tokens, np.float64)[:, :, None]
    sig = np.divide(counts, n, out=np.zeros(counts.shape, np.float64), where=n > 0)
    return sig.reshape(len(sig), -1)


# -- classification: see moescope.inference -------------------------------------------------------
#: What the classifier is, for params and docs (moescope.inference.ridge_cv).
CLASSIFIER = ("one-vs-rest ridge on one-hot labels, features standardised in each training fold, penalty tuned in "
              "each training fold by exact leave-one-group-out error over " + ", ".join(map(str, inf.ALPHA_FACTORS))
              + " x mean squared singular value")


# -- the analysis ----------------------------------------------------------------------------------
def first_n_grid(max_len: int, requested: Sequence[int] | None = None) -> list[int]:
    """Token counts for the separability-vs-tokens-seen curve: 1, 2, 4, ... below max_len."""
    if requested:
        return sorted({int(n) for n in requested if 0 < int(n) < max_len})
    grid, n = [], 1
    while n < max_len:
        grid.append(n)
        n *= 2
    return grid


def _max_length(trace: Trace, phase: str) -> int:
    if trace.has("tokens"):
        where = "" if phase == "all" else f"WHERE phase = '{phase}'"
        return int(trace.scalar(f"SELECT max(n) FROM (SELECT count(*) AS n FROM tokens {where} GROUP BY seq_id)") or 0)
    first = trace.moe_layers[0]
    return int(trace.scalar(f"SELECT max(n) FROM (SELECT count(*) AS n FROM routes WHERE layer = {first} GROUP BY seq_id)") or 0)


@dataclass
class SignatureInputs:
    """Everything the signature analysis reads from a trace (then it is pure computation).

    seq_counts: expert counts per labelled sequence (and position bucket); labels: (S,) text;
    groups: (S,) group of each sequence (e.g. its document id) or None; seq_tokens:
    :func:`sequence_token_counts` output and seq_token_experts: per-sequence token-expert
    counts (None without a tokens table); token_expert: whole-trace counts (kept for callers
    that read them; the control is fitted per fold from seq_token_experts)."""

    seq_counts: SequenceCounts
    labels: np.ndarray
    moe_layers: list[int]
    n_experts: int
    top_k: int
    token_expert: dict[str, np.ndarray] | None
    seq_tokens: dict[str, np.ndarray] | None
    notes: list[str]
    groups: np.ndarray | None = None
    group_field: str | None = None
    seq_token_experts: SequenceTokenExperts | None = None


#: Above this many expert assignments (tokens x MoE layers x k; 4 bytes each, kept per sequence in
#: a temporary file: 8 GB of disk at the limit, not memory), the token-id control falls back to
#: one whole-trace map (noted).
MAX_SEQUENCE_TOKEN_EXPERT_ROWS = 2_000_000_000

#: CV repeats that carry the label shuffles of the permutation tests (the first ones).
PERMUTED_REPEATS = 1

#: The sequences field that groups pieces of one document, used without --group when present
#: (the built-in prompts and the default model's probe texts carry it).
DEFAULT_GROUP_FIELD = "doc_id"


def signature_buckets(trace: Trace, phase: str = "prompt", first_n: Sequence[int] | None = None) -> list[int]:
    """The position buckets the signatures need (for the accuracy-vs-tokens-seen curve)."""
    return first_n_grid(_max_length(trace, phase), first_n)


def shared_counts(trace: Trace, *, phase: str = "prompt", first_n: Sequence[int] | None = None) -> RouteCounts:
    """One streaming pass over the routes of `phase` that serves both
    ``gather_statistics_inputs(trace, phase=phase, counts=...)`` and
    ``gather_signature_inputs(trace, ..., phase=phase, counts=...)``: half the reading of two passes."""
    return count_routes(trace, phase=phase, scan=True, sequences=True, bucket_edges=signature_buckets(trace, phase, first_n),
                        token_experts=trace.has("tokens"), sequence_keys_limit=MAX_SEQUENCE_TOKEN_EXPERT_ROWS)


def resolve_group(trace: Trace, group: str | None) -> str | None:
    """The grouping field to use: `group` as given ('none' for no grouping), else
    DEFAULT_GROUP_FIELD when the sequences carry it, else None."""
    if group is not None:
        return None if group.lower() == "none" else group
    columns = trace.columns("sequences") if trace.has("sequences") else []
    return DEFAULT_GROUP_FIELD if DEFAULT_GROUP_FIELD in columns else None


def gather_signature_inputs(trace: Trace, label: str, *, phase: str = "prompt", group: str | None = None,
                            first_n: Sequence[int] | None = None, counts: RouteCounts | None = None,
                            max_sequences: int | None = None, seed: int = 0) -> SignatureInputs:
    """Read the counts of the analysis from the trace (DuckDB aggregations, bounded memory) and
    check the labels (DataError with the fix when they cannot be analysed). `counts`: a
    :func:`count_routes` result of the same phase with sequences split at
    :func:`signature_buckets` (and token experts), e.g. shared with the statistics. `group`:
    sequences field grouping the sequences for CV (None: DEFAULT_GROUP_FIELD when present;
    'none': no grouping). max_sequences: count and analyse a sample of about this many
    labelled sequences (stratified by label, whole groups, drawn with `seed`; see
    :mod:`moescope.analysis.sequence_sample`), so memory stays bounded whatever the trace's size."""
    notes: list[str] = []
    if phase != "prompt" and not trace.has("tokens"):
        raise DataError(f"{trace.path} has no tokens table, so phases are unknown; use --phase prompt")
    if phase == "prompt" and not trace.has("tokens"):
        notes.append("no tokens table: every routed token is taken as a prompt token")
    labels_by_seq = read_labels(trace, label)
    group_field = resolve_group(trace, group)
    groups_by_seq = read_labels(trace, group_field) if group_field else None
    if group_field and group is None:
        notes.append(f"cross-validation grouped by the sequences field {group_field!r} (found in the trace): pieces of one "
                     "document never sit in both train and test; --group none to switch off")
    sample = None
    if max_sequences is not None:
        sample = _sample(labels_by_seq, groups_by_seq, max_sequences, seed)
        if len(sample) < len(labels_by_seq):
            notes.append(f"{len(sample)} of {len(labels_by_seq)} labelled sequences analysed (--max-sequences "
                         f"{max_sequences}: a sample stratified by label, whole {group_field or 'sequences'}, seed {seed})")
        else:
            sample = None
    if counts is None:
        counts = count_routes(trace, phase=phase, scan=False, sequences=True,
                              bucket_edges=signature_buckets(trace, phase, first_n), token_experts=trace.has("tokens"),
                              sequence_ids=sample, sequence_keys_limit=MAX_SEQUENCE_TOKEN_EXPERT_ROWS)
    seqc = counts.sequences
    keep = np.isin(seqc.seq_ids, list(labels_by_seq)) & (seqc.n_tokens.sum(axis=(1, 2)) > 0)
    if groups_by_seq is not None:
        keep &= np.isin(seqc.seq_ids, list(groups_by_seq))
    in_sample = np.ones(len(keep), bool) if sample is None else np.isin(seqc.seq_ids, sample)
    left_out = int((in_sample & ~keep).sum())  # sequences outside the sample are not "left out"
    keep &= in_sample
    if left_out:
        notes.append(f"{left_out} sequence(s) without a label{' or group' if group_field else ''} "
                     f"or without {phase} tokens left out")
    if not keep.all():  # boolean indexing copies the largest array: only when something is left out
        seqc = seqc.select(keep)
    y = np.array([labels_by_seq[int(s)] for s in seqc.seq_ids], dtype=object).astype(str)
    check_labels(y, label)
    groups = (np.array([groups_by_seq[int(s)] for s in seqc.seq_ids], dtype=object).astype(str)
              if groups_by_seq is not None else None)
    tok_exp, seq_tok, ste = counts.token_experts, None, None
    if trace.has("tokens"):
        seq_tok = sequence_token_counts(trace, phase=phase, seq_ids=None if sample is None else seqc.seq_ids)
        rows = int(seq_tok["n"][np.isin(seq_tok["seq_id"], seqc.seq_ids)].sum()) * len(trace.moe_layers) * trace.top_k
        if rows <= MAX_SEQUENCE_TOKEN_EXPERT_ROWS:
            recorded = counts.seq_token_experts  # kept by the counting pass (no second pass over the routes)
            ste = (recorded.select(seqc.seq_ids) if recorded is not None
                   else sequence_token_expert_counts(trace, phase=phase, seq_ids=seqc.seq_ids))
        else:
            notes.append(f"{rows:,} per-sequence token-expert assignments are too many to hold, so the token-id "
                         "control uses one whole-trace map for every fold: it has seen the test sequences' own routing "
                         "(optimistic for the control, conservative for 'routing adds'); --max-sequences N keeps "
                         "the control fitted per fold")
    else:
        notes.append("no tokens table: bag-of-tokens and token-id controls skipped")
    return SignatureInputs(seqc, y, trace.moe_layers, trace.n_experts, trace.top_k, tok_exp, seq_tok, notes,
                           groups=groups, group_field=group_field, seq_token_experts=ste)


def _sample(labels_by_seq: dict[int, str], groups_by_seq: dict[int, str] | None, max_sequences: int,
            seed: int) -> np.ndarray:
    """The --max-sequences sample among the labelled (and grouped) sequences."""
    from moescope.analysis.sequence_sample import sample_sequences

    if max_sequences < 1:
        raise DataError(f"--max-sequences must be at least 1, not {max_sequences}")
    ids = np.array(sorted(s for s in labels_by_seq if groups_by_seq is None or s in groups_by_seq), np.int64)
    labels = np.array([labels_by_seq[int(s)] for s in ids], dtype=object).astype(str)
    groups = None if groups_by_seq is None else np.array([groups_by_seq[int(s)] for s in ids], dtype=object).astype(str)
    return sample_sequences(ids, labels, groups, max_sequences, seed)


def routing_signatures(
    trace: Trace,
    *,
    label: str,
    group: str | None = None,
    folds: int = 5,
    repeats: int = 5,
    permutations: int = 200,
    seed: int = 0,
    phase: str = "prompt",
    control_draws: int = 3,
    first_n: Sequence[int] | None = None,
    figures: bool = True,
    n_jobs: int = 1,
    max_sequences: int | None = None,
    layer_permutations: int | None = None,
) -> AnalysisResult:
    """Task routing signatures of a labelled trace against their baselines (analysis="signatures").

    Args:
        label: the sequences field holding each sequence's label.
        group: the sequences field grouping sequences that must stay on one side of every split
            (e.g. a document id). None: 'doc_id' when the trace has it; 'none': no grouping.
        folds: stratified grouped CV folds (reduced to the groups of the rarest label, noted).
        repeats: CV repeats, each with its own shuffle (the CI is over all repeats x folds).
        permutations: group-level label shuffles, each through the identical procedure.
        layer_permutations: most shuffles one layer's sequential test may draw (None: enough
            for p <= 0.01 after Holm across the layers; see moescope.analysis.signature_layers).
        phase: 'prompt' (default), 'generated' or 'all' tokens; prefill and decode are kept
            apart unless asked. A trace without a tokens table counts as prompt only.
        control_draws: re-draws of the load-balancing control (mean +- sd over them).
        first_n: token counts for the accuracy-vs-tokens-seen curve (default 1, 2, 4, ...).
        n_jobs: threads over the CV folds.
        max_sequences: analyse a sample of about this many labelled sequences (stratified by
            label, whole groups, drawn with `seed`); None: all of them.
    """
    inputs = gather_signature_inputs(trace, label, phase=phase, group=group, first_n=first_n,
                                     max_sequences=max_sequences, seed=seed)
    values, figs = evaluate_signatures(inputs, label=label, folds=folds, repeats=repeats, permutations=permutations,
                                       seed=seed, phase=phase, control_draws=control_draws, figures=figures, n_jobs=n_jobs,
                                       layer_permutations=layer_permutations)
    params = {"label": label, "group": inputs.group_field, "folds_requested": folds, "folds": values["folds"],
              "repeats": repeats, "permutations": permutations, "layer_permutations": layer_permutations,
              "seed": seed, "phase": phase,
              "control_draws": control_draws, "max_sequences": max_sequences,
              "first_n": inputs.seq_counts.bucket_edges[1:].tolist(),
              "phases_in_trace": sorted(trace_phases(trace)), "classifier": CLASSIFIER, "notes": values["notes"]}
    return AnalysisResult("signatures", values, params=params, figures=figs, trace=str(trace.path))


def evaluate_signatures(inputs: SignatureInputs, *, label: str, folds: int = 5, repeats: int = 5, permutations: int = 200,
                        seed: int = 0, phase: str = "prompt", control_draws: int = 3, figures: bool = True,
                        n_jobs: int = 1, layer_permutations: int | None = None) -> tuple[dict[str, Any], dict]:
    """The pure half of :func:`routing_signatures`: (values, figures) from the gathered counts."""
    from threadpoolctl import threadpool_limits

    # Many small factorisations: BLAS threads inside each only contend on a busy machine, so
    # BLAS is single-threaded and the parallelism (n_jobs) is over folds.
    with threadpool_limits(limits=1):
        return _evaluate(inputs, label, folds, repeats, permutations, seed, phase, control_draws, figures, n_jobs,
                         layer_permutations)


def _layer(F: Any, i: int, E: int) -> Any:
    """Layer i's E columns of the (S, L * E) features F, dense when F is built a block of rows at a
    time: S x E float64 is small (128 MB at 250,000 sequences x 64 experts), and each fit on it then
    reads it instead of rebuilding its rows three times (every per-layer fit, shuffle batch and fold)."""
    part = F[:, i * E:(i + 1) * E]
    return np.asarray(part, np.float64) if isinstance(part, ChunkedMatrix) else part


def _cv_keys(prefix: str, res: inf.CVResult) -> dict[str, Any]:
    ci = res.ci()
    return {f"{prefix}_mean": res.accuracy, f"{prefix}_sd": float(np.std(res.folds, ddof=1)) if len(res.folds) > 1 else 0.0,
            f"{prefix}_ci_low": ci["ci_low"], f"{prefix}_ci_high": ci["ci_high"]}


def _paired(name: str, a: inf.CVResult, b: inf.CVResult) -> dict[str, Any]:
    r = inf.paired_comparison(a.folds, b.folds, a.n_train, a.n_test)
    return {name: r["difference"], f"{name}_ci_low": r["ci_low"], f"{name}_ci_high": r["ci_high"],
            f"{name}_p_value": r["p_value"]}


def _evaluate(inputs: SignatureInputs, label: str, folds: int, repeats: int, permutations: int, seed: int, phase: str,
              control_draws: int, figures: bool, n_jobs: int,
              layer_permutations: int | None = None) -> tuple[dict[str, Any], dict]:
    from sklearn.metrics import confusion_matrix, f1_score

    notes = list(inputs.notes)
    seqc, y, groups = inputs.seq_counts, inputs.labels, inputs.groups
    grid = seqc.bucket_edges[1:].tolist()
    k_used = inf.usable_folds(y, groups, folds)
    if k_used < 2:
        raise DataError(f"a label of field {label!r} sits in fewer than 2 groups of {inputs.group_field!r}; "
                        "cross-validation needs every label in at least 2 groups (add documents or use --group none)")
    if k_used < folds:
        unit = f"groups of {inputs.group_field!r}" if groups is not None else "sequences"
        notes.append(f"folds reduced from {folds} to {k_used}: the rarest label has {k_used} {unit}")
    repeats = max(1, int(repeats))
    splits = inf.repeated_grouped_splits(y, groups, folds=k_used, repeats=repeats, seed=seed)
    # The label shuffles run on the first CV repeat only: the permutation p then tests that
    # repeat's accuracy against the same statistic of every shuffle (a valid test; the reported
    # accuracy and its CI still pool every repeat), at a fifth of the cost of shuffling all five.
    # As int8 codes (PermutedLabels): 200 shuffles of 250,000 labels are 50 MB, not 1 GB of text.
    perms = inf.fold_permutations(y, groups, splits[:PERMUTED_REPEATS], permutations, seed=seed + 7919,
                                  as_codes=True)

    def cv(features: Any, *, with_perms: bool = False, standardize: bool = True) -> inf.CVResult:
        return inf.ridge_cv(features, y, splits, groups=groups, permuted_labels=perms if with_perms else None,
                            standardize=standardize, n_jobs=n_jobs)

    S, L, E = len(y), len(inputs.moe_layers), inputs.n_experts
    counts, n_tok = seqc.total()
    X = signature_vectors(counts, n_tok)
    names, per_label = np.unique(y, return_counts=True)
    v: dict[str, Any] = {"label": label, "labels": names.tolist(), "n_per_label": per_label.tolist(), "n_sequences": S,
                         "phase": phase, "moe_layers": inputs.moe_layers, "folds": k_used, "cv_repeats": repeats,
                         "permutation_repeats": min(PERMUTED_REPEATS, repeats),
                         "group_field": inputs.group_field,
                         "n_groups": int(len(np.unique(groups))) if groups is not None else S,
                         "chance_accuracy": float(per_label.max() / S), "uniform_chance_accuracy": 1.0 / len(names)}
    v.update(cosine_stats(X, y))
    main = cv(X, with_perms=True)
    pred0 = main.pooled_predictions(0)
    v.update(_cv_keys("cv_accuracy", main))
    v.update(cv_fold_accuracies=main.folds, cv_repeat_accuracies=main.repeat_accuracy,
             macro_f1=float(np.mean([f1_score(y, main.pooled_predictions(r), labels=names, average="macro")
                                     for r in range(repeats)])),
             confusion_matrix=confusion_matrix(y, pred0, labels=names),
             penalty_factor_median=float(np.median(main.alpha_factor)))
    perm = main.null_accuracy
    v.update(permutation_accuracies=perm,
             permutation_accuracy_mean=float(perm.mean()) if len(perm) else None,
             permutation_accuracy_sd=float(perm.std(ddof=1)) if len(perm) > 1 else None,
             permutation_accuracy_p95=float(np.percentile(perm, 95)) if len(perm) else None,
             permutation_p_value=main.p_value,
             permutation_p_value_floor=inf.permutation_floor(len(perm)) if len(perm) else None,
             permutation_p_value_text=inf.format_p(main.p_value, len(perm)) if len(perm) else None)
    # load-balancing control (label-free draws; the classifier is fitted and tuned as above)
    rng = np.random.default_rng(seed)
    lb_acc, lb_cos = [], []
    for _ in range(control_draws):
        Xb = signature_vectors(load_balanced_counts(counts, rng), n_tok)
        # each draw is a fresh random control: its first CV repeat suffices (draws x 5 fits, not draws x 25)
        lb_acc.append(inf.ridge_cv(Xb, y, splits[:1], groups=groups, n_jobs=n_jobs).accuracy)
        lb_cos.append(cosine_stats(Xb, y))
        del Xb  # its counts go before the next draw's are made (0.5 GB each at 250,000 sequences)
    v.update(load_balanced_accuracy_mean=float(np.mean(lb_acc)) if lb_acc else None,
             load_balanced_accuracy_sd=float(np.std(lb_acc, ddof=1)) if len(lb_acc) > 1 else None,
             load_balanced_cohens_d=float(np.mean([c["cohens_d"] for c in lb_cos])) if lb_cos else None,
             load_balanced_within_cosine_mean=float(np.mean([c["within_cosine_mean"] for c in lb_cos])) if lb_cos else None,
             load_balanced_across_cosine_mean=float(np.mean([c["across_cosine_mean"] for c in lb_cos])) if lb_cos else None)
    # token identity: bag of token ids and the token-id routing control, both fitted per fold
    for key in ("bag_of_tokens_accuracy", "token_id_control_accuracy"):
        v.update({f"{key}_{s}": None for s in ("mean", "sd", "ci_low", "ci_high")})
    for key in ("adds_over_bag_of_tokens", "adds_over_token_id_control"):
        v.update({f"{key}{s}": None for s in ("", "_ci_low", "_ci_high", "_p_value")})
    v.update(bag_of_tokens_columns=None, token_id_control_cohens_d=None, token_id_control_unseen_token_share=None,
             token_id_control_fitted_per_fold=None,
             per_layer_token_id_control_accuracy=None)
    control_features: list[np.ndarray] | None = None
    if inputs.seq_tokens is not None and (inputs.seq_token_experts is not None or inputs.token_expert is not None):
        bag_counts = token_count_matrix(inputs.seq_tokens, seqc.seq_ids)
        bag = cv(tfidf_fold_features(bag_counts), standardize=False)
        cap = bag_cap(max(len(tr) for rep in splits for tr, _ in rep), bag_counts.shape[1])
        v["bag_of_tokens_columns"] = bag_counts.shape[1] if cap is None else cap
        if cap is not None:
            notes.append(f"bag of tokens: {bag_counts.shape[1]:,} token ids in more than {cap:,} training sequences "
                         f"are too many for an exact ridge fit in bounded memory, so each training fold keeps its "
                         f"{cap - 1:,} most widespread ids and pools the rest into one column (a slightly weaker "
                         f"control than the full vocabulary: what the rare ids carry is not in it)")
        if inputs.seq_token_experts is not None:
            ste = inputs.seq_token_experts
            control = TokenIdControl(ste, token_count_matrix(inputs.seq_tokens, seqc.seq_ids, ste.vocab), n_tok,
                                     inputs.top_k)
        else:
            vocab = np.unique(inputs.seq_tokens["token_id"][np.isin(inputs.seq_tokens["seq_id"], seqc.seq_ids)])
            control = whole_trace_control(inputs.token_expert, token_count_matrix(inputs.seq_tokens, seqc.seq_ids, vocab),
                                          vocab, n_tok, L, E, inputs.top_k)
        flat = [sp for rep in splits for sp in rep]
        fitted = inf.thread_map(lambda split: control.fold(*split), flat, n_jobs)
        control_features = [f for f, _ in fitted]
        tcv = cv(lambda j, tr, te: (control_features[j][tr], control_features[j][te]))
        full_map = signature_vectors(control.base_counts, n_tok)  # (S, L * E); built per block when large
        v.update(_cv_keys("bag_of_tokens_accuracy", bag))
        v.update(_cv_keys("token_id_control_accuracy", tcv))
        v.update(_paired("adds_over_bag_of_tokens", main, bag))
        v.update(_paired("adds_over_token_id_control", main, tcv))
        v.update(token_id_control_cohens_d=cosine_stats(full_map, y)["cohens_d"],
                 token_id_control_unseen_token_share=float(np.mean([u for _, u in fitted])),
                 token_id_control_fitted_per_fold=control.per_fold)
    # per layer: accuracy with CI, permutation p (same shuffles), Holm; the control per layer
    budget = layer_permutation_budget(permutations, layer_permutations, L)
    per_layer, p_layer, layer_draws, gaps = [], [], [], []
    for i in range(L):  # one layer's (S, E) features at a time, built once for all its fits
        Xi = _layer(X, i, E)
        first = cv(Xi, with_perms=True)
        p, drawn = layer_p_value(Xi, first, y, splits, groups, max_draws=budget, seed=seed, n_jobs=n_jobs,
                                 permuted_repeats=min(PERMUTED_REPEATS, repeats))
        cos = cosine_stats(Xi, y)
        per_layer.append(first)
        p_layer.append(float("nan") if p is None else p)
        layer_draws.append(drawn)
        gaps.append(cos["within_cosine_mean"] - cos["across_cosine_mean"])
        del Xi
    cis = [r.ci() for r in per_layer]
    rep_acc = np.array([r.repeat_accuracy for r in per_layer])  # (L, R)
    best = int(np.argmax(rep_acc.mean(axis=1)))
    if budget and L > 1 and L * inf.permutation_floor(budget) > 0.05:
        notes.append(f"with at most {budget} label shuffles per layer and {L} layers, a Holm-corrected per-layer p "
                     f"cannot fall below {min(1.0, L * inf.permutation_floor(budget)):.3g}; --layer-permutations "
                     f"{inf.holm_ready_draws(L)} lets a layer reach 0.01 after the correction")
    v.update(per_layer_accuracy=[r.accuracy for r in per_layer], per_layer_accuracy_ci_low=[c["ci_low"] for c in cis],
             per_layer_accuracy_ci_high=[c["ci_high"] for c in cis], per_layer_p_value=p_layer,
             per_layer_permutations=layer_draws, per_layer_permutations_max=budget,
             per_layer_p_value_holm=inf.holm(p_layer).tolist(), per_layer_cosine_gap=gaps,
             best_layer=int(inputs.moe_layers[best]),
             best_layer_stability=float(np.mean(np.argmax(rep_acc, axis=0) == best)))
    if control_features is not None:
        v["per_layer_token_id_control_accuracy"] = [
            cv(lambda j, tr, te, i=i: (lambda F: (F[tr], F[te]))(_layer(control_features[j], i, E))).accuracy
            for i in range(L)]
    curve_n, curve_acc, curve_tokens = [], [], []
    for n in grid:
        c_n, t_n = seqc.first(n)
        curve_n.append(n)
        curve_tokens.append(float(t_n.max(axis=1).mean()))
        # descriptive curve: the first CV repeat only (a fifth of the fits of the full design)
        curve_acc.append(inf.ridge_cv(signature_vectors(c_n, t_n), y, splits[:1], groups=groups, n_jobs=n_jobs).accuracy)
        del c_n  # freed before the next point's counts are summed
    curve_n.append(int(n_tok.max()))
    curve_tokens.append(float(n_tok.max(axis=1).mean()))
    curve_acc.append(float(main.repeat_accuracy[0]))
    v.update(first_n_tokens=curve_n, first_n_mean_tokens=curve_tokens, first_n_accuracy=curve_acc)
    v["notes"] = notes
    figs = {}
    if figures:
        from moescope.analysis import signature_plots

        figs = signature_plots.signature_figures(v, X, y, seed)
    return v, figs
