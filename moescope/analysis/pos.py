"""Part-of-speech sensitivity of routers (Antoine, Béchet & Langlais, COLING 2025), against chance.

Input: a tokens table with a ``upos`` column (a tag per token; null = untagged, left out) and
the routes table. A token's *routing path* is its k experts at every MoE layer; as features,
one multi-hot block of E per layer, concatenated (L·E features, k·L ones per token).

What is measured (all pure numpy / scikit-learn, seeded):

- **Probe and baselines** (:mod:`moescope.analysis.pos_probe`): repeated stratified K-fold
  cross-validation grouped by sentence; a ridge probe on the routing path with nested penalty
  tuning; word-form, word-level and majority baselines on the same folds, word form and probe
  also split by whether the token id was seen in the training folds; the paired probe − word
  form test. Macro-F1, per-tag F1 and the confusion matrix over the pooled out-of-fold
  predictions of the first repeat. Tags in fewer sentences than folds are dropped (listed in
  ``dropped_tags``).
- **Spec(POS, expert)** per layer = share of the POS's tokens routed to the expert / (k/E),
  the share under uniform routing: 1 = uniform, >1 over-used. Each POS's top-3 experts' mean
  gain over uniform (Spec − 1; the paper's "25–36% above uniform").
- **KL(POS's expert distribution || uniform)** per layer, in nats: the distribution is the
  POS's assignment shares normalised to sum 1 (Spec·/E).
- Both against the **token-identity null** (:mod:`moescope.analysis.pos_null`): tags permuted
  among occurrences of the same token id, a p per tag × layer, Holm across all cells. The naive
  null (tags shuffled across all tokens: ``*_naive_null`` keys) is kept only next to it, to show
  what it would claim: a router that follows token ids beats it without knowing anything of POS,
  so it is never evidence and carries no p.
- **t-SNE** of the routing paths of a bounded sample, coloured by POS.
- **Ablation**: probe accuracy (same folds, same tuning) with the first n or the last n MoE
  layers dropped from the path.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse

from moescope.analysis.pos_null import default_permutations, token_identity_null
from moescope.analysis.result import AnalysisResult
from moescope.analysis.pos_probe import ablation_accuracy, cv_splits, probe_and_baselines, word_keys
from moescope.inference import holm, usable_folds
from moescope.errors import DataError


@dataclass(frozen=True)
class PosParams:
    """Parameters of the POS analysis.

    Attributes:
        folds: cross-validation folds (stratified; grouped by sentence unless cv_groups="token").
        repeats: repetitions of the K-fold split (a fresh shuffle each).
        cv_groups: "sentence" (no sentence in both train and test) or "token" (ungrouped).
        seed: seeds the subsample, folds, shuffles, permutations and t-SNE.
        max_tokens: tokens used by the probe (a seeded random subsample above that); the
            Spec / KL statistics use every tagged token.
        n_shuffles: tag permutations of the probe's token-identity null (and shuffles of the
            naive KL / Spec null shown next to the token-identity null); 100 puts the probe's p floor at 0.0099.
        tsne_points: tokens in the t-SNE (0: no t-SNE).
        ablation: numbers of layers to drop (None: about 1, L/4, L/2, 3L/4 and L−1).
        top_n: experts per POS whose gain over uniform is reported.
        token_null_permutations: permutations of the token-identity null of KL / Spec (tags
            permuted among occurrences of one token id); None: enough for a cell at the
            permutation floor to survive Holm at 0.01 (100 × tags × layers).
    """

    folds: int = 5
    repeats: int = 3
    cv_groups: str = "sentence"
    seed: int = 0
    max_tokens: int = 20_000
    n_shuffles: int = 100
    tsne_points: int = 1500
    ablation: tuple[int, ...] | None = None
    top_n: int = 3
    token_null_permutations: int | None = None


# -- routing paths ----------------------------------------------------------------------------
def routing_paths(tokens: pa.Table, routes: pa.Table, moe_layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(paths, rows): paths (n, L, k) int16 expert ids of the token rows `rows` of `tokens` that
    have a route at every MoE layer (in moe_layers order); other tokens are left out."""
    layers = np.asarray(sorted(int(x) for x in moe_layers), dtype=np.int64)
    experts = routes.column("experts").combine_chunks()
    lengths = pc.list_value_length(experts).to_numpy(zero_copy_only=False)
    if not len(lengths):
        raise DataError("the routes table is empty: nothing to analyse")
    k = int(lengths[0])
    if np.any(lengths != k):
        raise DataError("routes hold varying numbers of experts per token; the POS probe needs a fixed top-k")
    flat = pc.list_flatten(experts).to_numpy(zero_copy_only=False).astype(np.int16).reshape(-1, k)
    r_layer = routes.column("layer").to_numpy().astype(np.int64)
    lidx = np.searchsorted(layers, r_layer)
    on_moe = (lidx < len(layers)) & (layers[np.minimum(lidx, len(layers) - 1)] == r_layer)
    r_key = _key(routes)[on_moe] * len(layers) + lidx[on_moe]
    order = np.argsort(r_key, kind="stable")
    r_key, flat = r_key[order], flat[on_moe][order]
    if not len(r_key):
        raise DataError(f"no routes at the MoE layers {list(layers)}: the trace and its manifest disagree")
    tok_key, L = _key(tokens), len(layers)
    # The L routes of a token sit at r_key = key*L + 0..L-1: find the first, check the last.
    first = np.searchsorted(r_key, tok_key * L)
    last = np.minimum(first + L - 1, len(r_key) - 1)
    complete = (first + L - 1 < len(r_key)) & (r_key[last] == tok_key * L + L - 1)
    complete &= r_key[np.minimum(first, len(r_key) - 1)] == tok_key * L
    rows = np.nonzero(complete)[0]
    paths = flat[first[rows, None] + np.arange(L)[None, :]]
    return paths, rows


def _key(table: pa.Table) -> np.ndarray:
    return (table.column("seq_id").to_numpy().astype(np.int64) << 32) | table.column("pos").to_numpy().astype(np.int64)


def path_features(paths: np.ndarray, n_experts: int) -> sparse.csr_matrix:
    """(n, L·E) sparse multi-hot features: column l·E + e is 1 when expert e was chosen at layer l."""
    n, L, k = paths.shape
    cols = (np.arange(L)[None, :, None] * n_experts + paths.astype(np.int64)).reshape(n, L * k)
    indptr = np.arange(0, n * L * k + 1, L * k)
    return sparse.csr_matrix((np.ones(n * L * k, np.float32), cols.ravel(), indptr), shape=(n, L * n_experts))


# -- probe ablation ----------------------------------------------------------------------------
def default_ablation(n_layers: int) -> list[int]:
    """Layers to drop: about 1, L/4, L/2, 3L/4 and L−1 (each in 1..L−1)."""
    wanted = {1, n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers - 1}
    return sorted(n for n in wanted if 1 <= n <= n_layers - 1)


# -- Spec and KL -----------------------------------------------------------------------------
def expert_counts(paths: np.ndarray, y: np.ndarray, n_tags: int, n_experts: int) -> np.ndarray:
    """(P, L, E) how many times tokens of each tag were sent to each expert at each layer."""
    n, L, k = paths.shape
    out = np.empty((n_tags, L, n_experts), dtype=np.int64)
    for layer in range(L):  # per layer: bounded memory (n·k indices at a time)
        idx = (y[:, None] * n_experts + paths[:, layer, :]).ravel()
        out[:, layer, :] = np.bincount(idx, minlength=n_tags * n_experts).reshape(n_tags, n_experts)
    return out


def spec_kl(counts: np.ndarray, tag_counts: np.ndarray, top_k: int, top_n: int = 3) -> dict[str, np.ndarray]:
    """Spec (P, L, E), KL from uniform in nats (P, L), and the top-n experts' mean gain Spec − 1 (P, L)."""
    n_experts = counts.shape[2]
    share = counts / np.maximum(tag_counts, 1)[:, None, None]  # sums to k over experts
    spec = share / (top_k / n_experts)
    q = share / top_k
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * np.log(q * n_experts), 0.0).sum(axis=2)
    top = -np.sort(-spec, axis=2)[:, :, :top_n]
    return {"spec": spec, "kl": kl, "top_gain": top.mean(axis=2) - 1.0}


#: What the naive null is, stored with its values in results.json.
NAIVE_NULL_NOTE = ("naive null, not evidence: tags shuffled across all tokens. Any router that sends a token id to "
                   "its own experts beats it, because the tag follows the id; read the token-identity null "
                   "(*_token_null keys) for evidence of POS routing")


def naive_null_spec_kl(paths: np.ndarray, y: np.ndarray, n_tags: int, n_experts: int, top_k: int,
                       n_shuffles: int, seed: int, top_n: int) -> dict[str, np.ndarray]:
    """The naive null (see NAIVE_NULL_NOTE): mean and 95th percentile over tag shuffles across all
    tokens (same tag counts) of KL and top-n gain, each (P, L)."""
    rng = np.random.default_rng(seed + 1)
    tag_counts = np.bincount(y, minlength=n_tags)
    kls, gains = [], []
    for _ in range(max(n_shuffles, 1)):
        s = spec_kl(expert_counts(paths, rng.permutation(y), n_tags, n_experts), tag_counts, top_k, top_n)
        kls.append(s["kl"])
        gains.append(s["top_gain"])
    kls, gains = np.stack(kls), np.stack(gains)
    return {"kl": kls.mean(0), "kl_p95": np.quantile(kls, 0.95, axis=0), "top_gain": gains.mean(0)}


# -- the analysis -------------------------------------------------------------------------
def _per_tag(tags: list[str], values: np.ndarray, digits: int = 5) -> dict[str, Any]:
    return {t: np.round(v, digits).tolist() for t, v in zip(tags, values)}


def _sd(a: np.ndarray) -> float:
    return float(a.std(ddof=1)) if len(a) > 1 else 0.0


def labelled_paths(tokens: pa.Table, routes: pa.Table, moe_layers: Sequence[int], min_count: int,
                   by_sentence: bool = True) -> dict[str, Any]:
    """Routing paths of the tagged tokens and their tag indices (tags by descending frequency).

    Returns paths (n, L, k), y (n,), token_ids (n,), seq_id (n,), word (n,: the word's index in its
    sentence, -1 when unknown), tags, tag_counts, and dropped_tags ({tag: token count} of tags in
    fewer than `min_count` sentences (tokens when not `by_sentence`), left out).
    """
    if "upos" not in tokens.column_names:
        raise DataError("the tokens table has no upos column: tag the trace first (see `moescope analyze pos --help`)")
    tokens = tokens.filter(pc.is_valid(tokens.column("upos")))
    paths, rows = routing_paths(tokens, routes, moe_layers)
    upos = np.asarray(tokens.column("upos").to_numpy(zero_copy_only=False), dtype=object)[rows].astype(str)
    token_ids = tokens.column("token_id").to_numpy().astype(np.int64)[rows]
    seq_id = tokens.column("seq_id").to_numpy().astype(np.int64)[rows]
    word = (tokens.column("word").to_numpy().astype(np.int64)[rows] if "word" in tokens.column_names
            else np.full(len(rows), -1, np.int64))
    names, inverse, counts = np.unique(upos, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    units = (np.array([len(np.unique(seq_id[inverse == i])) for i in range(len(names))]) if by_sentence else counts)
    keep = units >= min_count
    order = np.lexsort((names[keep], -counts[keep]))  # by frequency, then name
    tags = [str(t) for t in names[keep][order]]
    unit = "sentences" if by_sentence else "tokens"
    if len(tags) < 2:
        raise DataError(f"only {len(tags)} tag(s) in at least {min_count} {unit}: a POS probe needs two or more")
    new_index = np.full(len(names), -1)
    new_index[np.nonzero(keep)[0][order]] = np.arange(len(tags))
    y = new_index[inverse]
    known = y >= 0
    return {"paths": paths[known], "y": y[known], "token_ids": token_ids[known], "seq_id": seq_id[known],
            "word": word[known], "tags": tags, "tag_counts": counts[keep][order],
            "dropped_tags": {str(t): int(c) for t, c, k in zip(names, counts, keep) if not k}}


def probe_values(paths: np.ndarray, y: np.ndarray, token_ids: np.ndarray, words: np.ndarray, seq_id: np.ndarray,
                 tags: list[str], n_experts: int, params: PosParams) -> dict[str, Any]:
    """The probe, its baselines on the same folds, the paired probe − word form test and the layer
    ablation (result values; accuracies are fractions of tokens, mean over repeats)."""
    from sklearn.metrics import confusion_matrix, f1_score

    P, L = len(tags), paths.shape[1]
    splits = cv_splits(y, seq_id, folds=params.folds, repeats=params.repeats, seed=params.seed,
                       grouped=params.cv_groups == "sentence")
    X = path_features(paths, n_experts)
    grouped = params.cv_groups == "sentence"
    r = probe_and_baselines(X, y, token_ids, words, seq_id, splits, n_tags=P, n_shuffles=params.n_shuffles,
                            seed=params.seed, grouped=grouped)
    ablation: dict[str, dict[str, Any]] = {"drop_first": {}, "drop_last": {}, "ci": {"drop_first": {}, "drop_last": {}}}
    steps = default_ablation(L) if params.ablation is None else [a for a in params.ablation if 1 <= a <= L - 1]
    for a in steps:
        for side, kept in (("drop_first", paths[:, a:]), ("drop_last", paths[:, : L - a])):
            ab = ablation_accuracy(path_features(np.ascontiguousarray(kept), n_experts), y, seq_id, splits, grouped)
            ablation[side][str(a)] = ab["accuracy"]
            ablation["ci"][side][str(a)] = ab["ci"]
    labels = np.arange(P)
    pred, wf_pred, seen = r.pop("_pred"), r.pop("_wf_pred"), r.pop("_seen")
    f1 = (lambda yy, p, avg: f1_score(yy, p, labels=labels, average=avg, zero_division=0))
    per_tag = (lambda yy, p: dict(zip(tags, np.round(f1(yy, p, None), 5).tolist())))
    return {
        "cv_groups": params.cv_groups, "cv_folds": len(splits[0]), "cv_repeats": len(splits),
        **{k: v for k, v in r.items()},
        "macro_f1": float(f1(y, pred, "macro")), "per_tag_f1": per_tag(y, pred),
        "per_tag_f1_seen": per_tag(y[seen], pred[seen]),
        "confusion_matrix": {"labels": tags, "counts": confusion_matrix(y, pred, labels=labels)},
        "majority_tag": tags[int(np.argmax(np.bincount(y, minlength=P)))],
        "word_form_macro_f1": float(f1(y, wf_pred, "macro")), "word_form_per_tag_f1": per_tag(y, wf_pred),
        "word_form_per_tag_f1_seen": per_tag(y[seen], wf_pred[seen]),
        "ablation": {"n_layers": L, "full": r["probe_accuracy"], "full_ci": r["probe_accuracy_ci"],
                     "drop_first": ablation["drop_first"], "drop_last": ablation["drop_last"], "ci": ablation["ci"]},
    }


def routing_values(paths: np.ndarray, y: np.ndarray, token_ids: np.ndarray, tags: list[str], tag_counts: np.ndarray,
                   n_experts: int, top_k: int, params: PosParams) -> dict[str, Any]:
    """Spec, top experts' gain and KL from uniform per POS and layer, with the token-identity null (tags
    permuted within token ids: p per tag x layer, Holm) and, labelled as such, the naive null (result values)."""
    P = len(tags)
    stats = spec_kl(expert_counts(paths, y, P, n_experts), tag_counts, top_k, params.top_n)
    chance = naive_null_spec_kl(paths, y, P, n_experts, top_k, params.n_shuffles, params.seed, params.top_n)
    weights = tag_counts / tag_counts.sum()  # per-layer summaries weight POS by token count
    top_experts = np.argsort(-stats["spec"], axis=2, kind="stable")[:, :, : params.top_n]
    n_perm = params.token_null_permutations or default_permutations(P * paths.shape[1])
    null = token_identity_null(paths, y, token_ids, n_tags=P, n_experts=n_experts, top_k=top_k, top_n=params.top_n,
                               n_permutations=n_perm, seed=params.seed + 5)
    kl_holm = holm(null["kl_p"].ravel()).reshape(null["kl_p"].shape)  # all tag x layer cells at once
    gain_holm = holm(null["gain_p"].ravel()).reshape(null["gain_p"].shape)
    return {
        "kl_from_uniform_token_null": _per_tag(tags, null["kl_null"]),
        "kl_token_null_p_value": _per_tag(tags, null["kl_p"], 6),
        "kl_token_null_p_value_holm": _per_tag(tags, kl_holm, 6),
        "kl_layer_mean_token_null": np.round(weights @ null["kl_null"], 5),
        "top_gain_token_null": _per_tag(tags, null["gain_null"]),
        "top_gain_token_null_p_value_holm": _per_tag(tags, gain_holm, 6),
        "token_null": {"permutations": n_perm, "n_tokens_permutable": null["n_tokens_permutable"],
                       "n_cells": int(kl_holm.size), "p_floor": 1.0 / (n_perm + 1),
                       "method": "tags permuted among occurrences of the same token id; one-sided p = "
                                 "(1 + #null >= observed) / (1 + permutations); Holm across all tag x layer cells"},
        "kl_units": "nats",
        "kl_from_uniform": _per_tag(tags, stats["kl"]),
        "naive_null": NAIVE_NULL_NOTE,
        "kl_from_uniform_naive_null": _per_tag(tags, chance["kl"]),
        "kl_from_uniform_naive_null_p95": _per_tag(tags, chance["kl_p95"]),
        "kl_layer_mean": np.round(weights @ stats["kl"], 5),
        "kl_layer_mean_naive_null": np.round(weights @ chance["kl"], 5),
        "spec": _per_tag(tags, stats["spec"], 4),
        "top_experts": dict(zip(tags, top_experts.tolist())),
        "top_gain": _per_tag(tags, stats["top_gain"]), "top_gain_naive_null": _per_tag(tags, chance["top_gain"]),
        "top_gain_layer_mean": np.round(weights @ stats["top_gain"], 5),
        "top_gain_layer_mean_naive_null": np.round(weights @ chance["top_gain"], 5),
    }


def pos_analysis(tokens: pa.Table, routes: pa.Table, *, n_experts: int, top_k: int, moe_layers: Sequence[int],
                 params: PosParams | None = None, tag_source: str | None = None, trace: str | None = None,
                 figures: bool = True) -> AnalysisResult:
    """Run every measure of the module doc; returns AnalysisResult(analysis="pos").

    `tokens` needs seq_id, pos, token_id, upos (null: untagged); `routes` seq_id, pos, layer,
    experts. Accuracies are fractions of tokens (0..1); KL in nats; Spec a ratio to uniform.
    """
    from threadpoolctl import threadpool_limits

    params = params or PosParams()
    if params.cv_groups not in ("sentence", "token"):
        raise DataError(f"cv_groups must be 'sentence' or 'token', not {params.cv_groups!r}")
    by_sentence = params.cv_groups == "sentence"
    d = labelled_paths(tokens, routes, moe_layers, params.folds, by_sentence)
    paths, y, tags = d["paths"], d["y"], d["tags"]
    n = len(y)
    # Probe sample: whole sentences in a seeded random order up to max_tokens bound the cost;
    # tags then in fewer sentences (tokens) than folds are left out of the probe.
    rng = np.random.default_rng(params.seed)
    uniq, per_sentence = np.unique(d["seq_id"], return_counts=True)
    order = rng.permutation(len(uniq))  # sentences in a seeded random order
    take = max(1, int(np.searchsorted(np.cumsum(per_sentence[order]), params.max_tokens, side="right")))
    sample = np.nonzero(np.isin(d["seq_id"], uniq[order[:take]]))[0] if n > params.max_tokens else np.arange(n)
    groups = d["seq_id"][sample] if by_sentence else sample
    present = np.array([len(np.unique(groups[y[sample] == t])) for t in range(len(tags))])
    sample = sample[present[y[sample]] >= params.folds]
    if usable_folds(y[sample], d["seq_id"][sample] if by_sentence else None, params.folds) < 2:
        raise DataError("too few sentences per tag for a cross-validated probe; give more text or fewer --folds")
    words = word_keys(d["seq_id"], d["word"], d["token_ids"])
    with threadpool_limits(1):  # 2-core machines: BLAS threads only contend with each other
        probe = probe_values(paths[sample], y[sample], d["token_ids"][sample], words[sample], d["seq_id"][sample],
                             tags, n_experts, params)
        routing = routing_values(paths, y, d["token_ids"], tags, d["tag_counts"], n_experts, top_k, params)
        embedding, emb_tags = _tsne(paths, y, n_experts, params) if params.tsne_points and figures else (None, None)
    values: dict[str, Any] = {
        "tag_source": tag_source, "n_tokens": n, "n_tokens_probe": int(len(sample)), "n_experts": n_experts,
        "top_k": top_k, "moe_layers": sorted(int(x) for x in moe_layers), "tags": tags,
        "tag_counts": dict(zip(tags, d["tag_counts"].tolist())), "dropped_tags": d["dropped_tags"],
        **probe, **routing,
    }
    result = AnalysisResult(analysis="pos", values=values, params=asdict(params), trace=trace)
    if figures:
        from moescope.analysis.pos_figures import pos_figures

        result.figures = pos_figures(values, embedding=embedding, embedding_tags=emb_tags)
    return result


def _tsne(paths: np.ndarray, y: np.ndarray, n_experts: int, params: PosParams) -> tuple[Any, Any]:
    """(points (m, 2), tag index per point) of a seeded t-SNE of at most `tsne_points` routing paths."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(params.seed + 2)
    m = min(params.tsne_points, len(y))
    if m < 10:  # t-SNE needs more points than its perplexity: too few to draw
        return None, None
    pick = np.sort(rng.choice(len(y), m, replace=False))
    X = path_features(paths[pick], n_experts).toarray()
    perplexity = float(min(30.0, max(2.0, (m - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=params.seed,
                  n_jobs=1).fit_transform(X)
    return points, y[pick]
