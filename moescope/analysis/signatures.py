"""Task routing signatures (Avinash 2026) with chance baselines and token-identity controls.

A sequence's signature: for each MoE layer l and expert e, the share of the sequence's
tokens (of the chosen phase) whose top-k at l holds e; L * E values (each layer's block sums
to k). :func:`routing_signatures` asks whether signatures tell the sequences' labels apart,
and how much of that is more than chance, load balance and token identity:

- cosine similarity within vs across labels, Cohen's d;
- logistic regression (standardised features), stratified k-fold CV: accuracy, macro-F1,
  confusion matrix; per MoE layer; on the first n tokens only;
- label permutation baseline (the same CV on shuffled labels);
- load-balancing control: per layer each expert's total count is kept and the assignments
  are dealt to the sequences at random (see :func:`load_balanced_counts`);
- bag of token ids (tf-idf) with the same classifier and folds;
- token-id routing control: every token given the k experts its token id gets most often
  at that layer (see :func:`token_id_control_counts`), then the same signature classifier.

docs/analyses/signatures.md defines every number and its baseline.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from moescope.analysis.result import AnalysisResult
from moescope.analysis.routing_counts import RouteCounts, SequenceCounts, count_routes, sequence_token_counts, trace_phases
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
def signature_vectors(counts: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """(S, L * E) float64: counts (S, L, E) over tokens n_tokens (S, L); 0 where a layer saw no token."""
    n = np.asarray(n_tokens, np.float64)[:, :, None]
    sig = np.divide(counts, n, out=np.zeros(counts.shape, np.float64), where=n > 0)
    return sig.reshape(len(sig), -1)


def cosine_stats(X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean and sd of the cosine similarity over all pairs of sequences with the same label
    (within) and with different labels (across), and Cohen's d = (within - across) / pooled sd.

    Exact, without the S x S matrix: for unit vectors U, the sum of pairwise cosines is
    (|sum U|^2 - n) / 2 and the sum of their squares (|U^T U|_F^2 - n) / 2."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    U = np.divide(X, norms, out=np.zeros_like(X, dtype=np.float64), where=norms > 0)
    n_unit = float((norms[:, 0] > 0).sum())
    tot_sum = (np.sum(U.sum(0) ** 2) - n_unit) / 2
    tot_sq = (np.sum((U.T @ U) ** 2) - n_unit) / 2
    tot_n = len(U) * (len(U) - 1) / 2
    w_sum = w_sq = w_n = 0.0
    for c in np.unique(y):
        Uc = U[y == c]
        nc = float((np.linalg.norm(Uc, axis=1) > 0).sum())
        w_sum += (np.sum(Uc.sum(0) ** 2) - nc) / 2
        w_sq += (np.sum((Uc.T @ Uc) ** 2) - nc) / 2
        w_n += len(Uc) * (len(Uc) - 1) / 2
    a_sum, a_sq, a_n = tot_sum - w_sum, tot_sq - w_sq, tot_n - w_n

    def mean_sd(s: float, sq: float, n: float) -> tuple[float, float]:
        if n < 1:
            return float("nan"), float("nan")
        mean = s / n
        var = max(sq / n - mean ** 2, 0.0) * (n / (n - 1) if n > 1 else 1.0)
        return mean, float(np.sqrt(var))

    wm, wsd = mean_sd(w_sum, w_sq, w_n)
    am, asd = mean_sd(a_sum, a_sq, a_n)
    pooled = np.sqrt(((w_n - 1) * wsd ** 2 + (a_n - 1) * asd ** 2) / max(w_n + a_n - 2, 1))
    d = (wm - am) / pooled if pooled > 0 else float("nan")
    return {"within_cosine_mean": wm, "within_cosine_sd": wsd, "across_cosine_mean": am, "across_cosine_sd": asd,
            "cohens_d": float(d), "n_within_pairs": int(w_n), "n_across_pairs": int(a_n)}


# -- classification --------------------------------------------------------------------------------
def signature_classifier(seed: int = 0) -> Any:
    """Standardised features -> multinomial logistic regression (L2, C = 1), fixed seed."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


def bag_of_tokens_classifier(seed: int = 0) -> Any:
    """tf-idf of token-id counts -> the same logistic regression."""
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfTransformer(), LogisticRegression(max_iter=2000, random_state=seed))


def folds_for(y: np.ndarray, folds: int) -> int:
    """The folds actually usable: at most the size of the smallest class."""
    return int(min(folds, np.unique(y, return_counts=True)[1].min()))


@dataclass
class CVScore:
    """Out-of-fold accuracy per fold, pooled predictions, macro-F1 and confusion matrix."""

    fold_accuracy: np.ndarray
    predictions: np.ndarray
    macro_f1: float
    confusion: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.fold_accuracy.mean())

    @property
    def sd(self) -> float:
        return float(self.fold_accuracy.std(ddof=1)) if len(self.fold_accuracy) > 1 else 0.0


def cross_validate(model: Any, X: Any, y: np.ndarray, folds: int, seed: int) -> CVScore:
    """Stratified k-fold (shuffled with `seed`) accuracy of `model` on (X, y)."""
    from sklearn.base import clone
    from sklearn.metrics import confusion_matrix, f1_score
    from sklearn.model_selection import StratifiedKFold

    pred = np.empty(len(y), dtype=y.dtype)
    acc = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds; accuracy is what we report
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
            fitted = clone(model).fit(X[train], y[train])
            pred[test] = fitted.predict(X[test])
            acc.append(float(np.mean(pred[test] == y[test])))
    labels = np.unique(y)
    return CVScore(np.array(acc), pred, float(f1_score(y, pred, labels=labels, average="macro")),
                   confusion_matrix(y, pred, labels=labels))


def permutation_scores(model: Any, X: np.ndarray, y: np.ndarray, folds: int, seed: int, permutations: int) -> np.ndarray:
    """Mean CV accuracy on `permutations` label shuffles (sklearn permutation_test_score)."""
    from sklearn.model_selection import StratifiedKFold, permutation_test_score

    if permutations <= 0:
        return np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, scores, _ = permutation_test_score(model, X, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                              n_permutations=permutations, random_state=seed, n_jobs=1)
    return np.asarray(scores)


# -- controls --------------------------------------------------------------------------------------
def load_balanced_counts(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Load-balancing control: per layer, each expert keeps its total count over all sequences and
    each sequence keeps its number of assignments, but which sequence gets which expert
    assignment is re-drawn uniformly (a random table with both margins fixed, drawn expert
    by expert as multivariate hypergeometric draws). Equivalent to shuffling the single
    expert assignments over all (token, slot) positions of the layer."""
    S, L, E = counts.shape
    out = np.zeros_like(counts)
    for li in range(L):
        remaining = counts[:, li, :].sum(axis=1).astype(np.int64)
        totals = counts[:, li, :].sum(axis=0).astype(np.int64)
        for e in np.argsort(-totals):  # largest first: numerically the cheapest order
            if totals[e] == 0:
                continue
            draw = rng.multivariate_hypergeometric(remaining, int(totals[e]))
            out[:, li, e] = draw
            remaining -= draw
    return out


def token_id_control_counts(tok_exp: dict[str, np.ndarray], seq_tok: dict[str, np.ndarray], seq_ids: np.ndarray,
                            n_layers: int, n_experts: int, top_k: int) -> np.ndarray:
    """Token-id routing control: (S, L, E) counts if every occurrence of a token id were sent to
    that id's k most frequent experts at the layer (ties to the lower expert id), frequencies
    taken over the analysed phase of the whole trace. A token id seen once keeps its own
    routing, so the control is an upper bound on what token identity alone explains."""
    from scipy.sparse import csr_matrix

    li, tok, ex = tok_exp["layer_index"], tok_exp["token_id"], tok_exp["expert"]
    key = li * (int(max(tok.max(initial=0), seq_tok["token_id"].max(initial=0))) + 1) + tok
    first = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    rank = np.arange(len(key)) - np.repeat(first, np.diff(np.r_[first, len(key)]))
    top = rank < top_k  # rows are sorted by (layer, token, count desc, expert)
    vocab, tok_col = np.unique(np.concatenate([tok, seq_tok["token_id"]]), return_inverse=True)
    tok_idx, seq_tok_idx = tok_col[:len(tok)], tok_col[len(tok):]
    keep = np.isin(seq_tok["seq_id"], seq_ids)
    A = csr_matrix((seq_tok["n"][keep].astype(np.float64),
                    (np.searchsorted(seq_ids, seq_tok["seq_id"][keep]), seq_tok_idx[keep])),
                   shape=(len(seq_ids), len(vocab)))
    out = np.zeros((len(seq_ids), n_layers, n_experts))
    for layer in range(n_layers):
        sel = top & (li == layer)
        M = csr_matrix((np.ones(int(sel.sum())), (tok_idx[sel], ex[sel])), shape=(len(vocab), n_experts))
        out[:, layer, :] = (A @ M).toarray()
    return out


def bag_of_tokens(seq_tok: dict[str, np.ndarray], seq_ids: np.ndarray) -> Any:
    """(S, V) sparse counts of each token id in each sequence (columns: ids present)."""
    from scipy.sparse import csr_matrix

    keep = np.isin(seq_tok["seq_id"], seq_ids)
    vocab, col = np.unique(seq_tok["token_id"][keep], return_inverse=True)
    return csr_matrix((seq_tok["n"][keep].astype(np.float64), (np.searchsorted(seq_ids, seq_tok["seq_id"][keep]), col)),
                      shape=(len(seq_ids), len(vocab)))


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
    token_expert: :func:`token_expert_counts` output and seq_tokens: :func:`sequence_token_counts`
    output (None without a tokens table)."""

    seq_counts: SequenceCounts
    labels: np.ndarray
    moe_layers: list[int]
    n_experts: int
    top_k: int
    token_expert: dict[str, np.ndarray] | None
    seq_tokens: dict[str, np.ndarray] | None
    notes: list[str]


def signature_buckets(trace: Trace, phase: str = "prompt", first_n: Sequence[int] | None = None) -> list[int]:
    """The position buckets the signatures need (for the accuracy-vs-tokens-seen curve)."""
    return first_n_grid(_max_length(trace, phase), first_n)


def shared_counts(trace: Trace, *, phase: str = "prompt", first_n: Sequence[int] | None = None) -> RouteCounts:
    """One streaming pass over the routes of `phase` that serves both
    ``gather_statistics_inputs(trace, phase=phase, counts=...)`` and
    ``gather_signature_inputs(trace, ..., phase=phase, counts=...)``: half the reading of two passes."""
    return count_routes(trace, phase=phase, scan=True, sequences=True, bucket_edges=signature_buckets(trace, phase, first_n),
                        token_experts=trace.has("tokens"))


def gather_signature_inputs(trace: Trace, label: str, *, phase: str = "prompt",
                            first_n: Sequence[int] | None = None, counts: RouteCounts | None = None) -> SignatureInputs:
    """Read the counts of the analysis from the trace (DuckDB aggregations, bounded memory) and
    check the labels (DataError with the fix when they cannot be analysed). `counts`: a
    :func:`count_routes` result of the same phase with sequences split at
    :func:`signature_buckets` (and token experts), e.g. shared with the statistics."""
    notes: list[str] = []
    if phase != "prompt" and not trace.has("tokens"):
        raise DataError(f"{trace.path} has no tokens table, so phases are unknown; use --phase prompt")
    if phase == "prompt" and not trace.has("tokens"):
        notes.append("no tokens table: every routed token is taken as a prompt token")
    labels_by_seq = read_labels(trace, label)
    if counts is None:
        counts = count_routes(trace, phase=phase, scan=False, sequences=True,
                              bucket_edges=signature_buckets(trace, phase, first_n), token_experts=trace.has("tokens"))
    seqc = counts.sequences
    keep = np.isin(seqc.seq_ids, list(labels_by_seq)) & (seqc.n_tokens.sum(axis=(1, 2)) > 0)
    if (~keep).any():
        notes.append(f"{int((~keep).sum())} sequence(s) without a label or without {phase} tokens left out")
    if not keep.all():  # boolean indexing copies the largest array: only when something is left out
        seqc = SequenceCounts(seqc.seq_ids[keep], seqc.counts[keep], seqc.n_tokens[keep], seqc.bucket_edges)
    y = np.array([labels_by_seq[int(s)] for s in seqc.seq_ids], dtype=object).astype(str)
    check_labels(y, label)
    tok_exp, seq_tok = counts.token_experts, None
    if trace.has("tokens"):
        seq_tok = sequence_token_counts(trace, phase=phase)
    else:
        notes.append("no tokens table: bag-of-tokens and token-id controls skipped")
    return SignatureInputs(seqc, y, trace.moe_layers, trace.n_experts, trace.top_k, tok_exp, seq_tok, notes)


def routing_signatures(
    trace: Trace,
    *,
    label: str,
    folds: int = 5,
    permutations: int = 200,
    seed: int = 0,
    phase: str = "prompt",
    control_draws: int = 3,
    first_n: Sequence[int] | None = None,
    figures: bool = True,
) -> AnalysisResult:
    """Task routing signatures of a labelled trace against their baselines (analysis="signatures").

    Args:
        label: the sequences field holding each sequence's label.
        folds: stratified CV folds (reduced to the smallest label's size, noted in params).
        permutations: label shuffles for the permutation baseline.
        phase: 'prompt' (default), 'generated' or 'all' tokens; prefill and decode are kept
            apart unless asked. A trace without a tokens table counts as prompt only.
        control_draws: re-draws of the load-balancing control (mean +- sd over them).
        first_n: token counts for the accuracy-vs-tokens-seen curve (default 1, 2, 4, ...).
    """
    inputs = gather_signature_inputs(trace, label, phase=phase, first_n=first_n)
    values, figs = evaluate_signatures(inputs, label=label, folds=folds, permutations=permutations, seed=seed,
                                       phase=phase, control_draws=control_draws, figures=figures)
    params = {"label": label, "folds_requested": folds, "folds": values["folds"], "permutations": permutations,
              "seed": seed, "phase": phase, "control_draws": control_draws,
              "first_n": inputs.seq_counts.bucket_edges[1:].tolist(), "phases_in_trace": sorted(trace_phases(trace)),
              "classifier": "StandardScaler + LogisticRegression(C=1, lbfgs, max_iter=2000)", "notes": values["notes"]}
    return AnalysisResult("signatures", values, params=params, figures=figs, trace=str(trace.path))


def evaluate_signatures(inputs: SignatureInputs, *, label: str, folds: int = 5, permutations: int = 200, seed: int = 0,
                        phase: str = "prompt", control_draws: int = 3, figures: bool = True) -> tuple[dict[str, Any], dict]:
    """The pure half of :func:`routing_signatures`: (values, figures) from the gathered counts."""
    from threadpoolctl import threadpool_limits

    # Hundreds of small model fits: BLAS/OpenMP threads only contend (measured 10x slower with
    # 2 threads on a busy 2-core machine), so this part runs single-threaded.
    with threadpool_limits(limits=1):
        return _evaluate(inputs, label, folds, permutations, seed, phase, control_draws, figures)


def _evaluate(inputs: SignatureInputs, label: str, folds: int, permutations: int, seed: int, phase: str,
              control_draws: int, figures: bool) -> tuple[dict[str, Any], dict]:
    notes = list(inputs.notes)
    seqc, y = inputs.seq_counts, inputs.labels
    grid = seqc.bucket_edges[1:].tolist()
    k_used = folds_for(y, folds)
    if k_used < folds:
        notes.append(f"folds reduced from {folds} to {k_used}: the smallest label has {k_used} sequences")
    S, L, E = len(y), len(inputs.moe_layers), inputs.n_experts
    counts, n_tok = seqc.total()
    X = signature_vectors(counts, n_tok)
    model = signature_classifier(seed)
    names, per_label = np.unique(y, return_counts=True)
    v: dict[str, Any] = {"label": label, "labels": names.tolist(), "n_per_label": per_label.tolist(), "n_sequences": S,
                         "phase": phase, "moe_layers": inputs.moe_layers, "folds": k_used,
                         "chance_accuracy": float(per_label.max() / S), "uniform_chance_accuracy": 1.0 / len(names)}
    v.update(cosine_stats(X, y))
    cv = cross_validate(model, X, y, k_used, seed)
    v.update(cv_accuracy_mean=cv.mean, cv_accuracy_sd=cv.sd, cv_fold_accuracies=cv.fold_accuracy, macro_f1=cv.macro_f1,
             confusion_matrix=cv.confusion)
    perm = permutation_scores(model, X, y, k_used, seed, permutations)
    v.update(permutation_accuracies=perm,
             permutation_accuracy_mean=float(perm.mean()) if len(perm) else None,
             permutation_accuracy_sd=float(perm.std(ddof=1)) if len(perm) > 1 else None,
             permutation_accuracy_p95=float(np.percentile(perm, 95)) if len(perm) else None,
             permutation_p_value=float((1 + np.sum(perm >= cv.mean)) / (1 + len(perm))) if len(perm) else None)
    # load-balancing control
    rng = np.random.default_rng(seed)
    lb_acc, lb_cos = [], []
    for _ in range(control_draws):
        Xb = signature_vectors(load_balanced_counts(counts, rng), n_tok)
        lb_acc.append(cross_validate(model, Xb, y, k_used, seed).mean)
        lb_cos.append(cosine_stats(Xb, y))
    v.update(load_balanced_accuracy_mean=float(np.mean(lb_acc)) if lb_acc else None,
             load_balanced_accuracy_sd=float(np.std(lb_acc, ddof=1)) if len(lb_acc) > 1 else None,
             load_balanced_cohens_d=float(np.mean([c["cohens_d"] for c in lb_cos])) if lb_cos else None,
             load_balanced_within_cosine_mean=float(np.mean([c["within_cosine_mean"] for c in lb_cos])) if lb_cos else None,
             load_balanced_across_cosine_mean=float(np.mean([c["across_cosine_mean"] for c in lb_cos])) if lb_cos else None)
    # token identity
    v.update(bag_of_tokens_accuracy_mean=None, bag_of_tokens_accuracy_sd=None, token_id_control_accuracy_mean=None,
             token_id_control_accuracy_sd=None, token_id_control_cohens_d=None, adds_over_bag_of_tokens=None,
             adds_over_token_id_control=None)
    if inputs.seq_tokens is not None and inputs.token_expert is not None:
        seq_tok = inputs.seq_tokens
        bag = cross_validate(bag_of_tokens_classifier(seed), bag_of_tokens(seq_tok, seqc.seq_ids), y, k_used, seed)
        ctrl_counts = token_id_control_counts(inputs.token_expert, seq_tok, seqc.seq_ids, L, E, inputs.top_k)
        Xt = signature_vectors(ctrl_counts, n_tok)
        tcv = cross_validate(model, Xt, y, k_used, seed)
        v.update(bag_of_tokens_accuracy_mean=bag.mean, bag_of_tokens_accuracy_sd=bag.sd,
                 token_id_control_accuracy_mean=tcv.mean, token_id_control_accuracy_sd=tcv.sd,
                 token_id_control_cohens_d=cosine_stats(Xt, y)["cohens_d"],
                 adds_over_bag_of_tokens=cv.mean - bag.mean, adds_over_token_id_control=cv.mean - tcv.mean)
    # per layer and per number of tokens seen
    per_layer = [cross_validate(model, X[:, i * E:(i + 1) * E], y, k_used, seed).mean for i in range(L)]
    gaps = [(lambda c: c["within_cosine_mean"] - c["across_cosine_mean"])(cosine_stats(X[:, i * E:(i + 1) * E], y))
            for i in range(L)]
    v.update(per_layer_accuracy=per_layer, per_layer_cosine_gap=gaps,
             best_layer=int(inputs.moe_layers[int(np.argmax(per_layer))]))
    curve_n, curve_acc, curve_tokens = [], [], []
    for n in grid:
        c_n, t_n = seqc.first(n)
        curve_n.append(n)
        curve_tokens.append(float(t_n.max(axis=1).mean()))
        curve_acc.append(cross_validate(model, signature_vectors(c_n, t_n), y, k_used, seed).mean)
    curve_n.append(int(n_tok.max()))
    curve_tokens.append(float(n_tok.max(axis=1).mean()))
    curve_acc.append(cv.mean)
    v.update(first_n_tokens=curve_n, first_n_mean_tokens=curve_tokens, first_n_accuracy=curve_acc)
    v["notes"] = notes
    figs = {}
    if figures:
        from moescope.analysis import signature_plots

        figs = signature_plots.signature_figures(v, X, y, seed)
    return v, figs
