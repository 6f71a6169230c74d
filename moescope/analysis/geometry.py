"""Is routing more than hidden-state geometry? (Wang, Hayou & Nalisnick 2026, study 5)

Per MoE layer, over tokens whose router input (hidden state) the trace sampled:

1. Pairs of tokens (uniform random pairs, plus pairs sharing a token id): hidden-state
   cosine (raw, and centred on the layer's mean hidden state) next to routing similarity
   (overlap |S_a ∩ S_b|/k, Hamming similarity of the k-hot masks, top-p Jaccard of router
   probabilities), and their Spearman rank correlation (analytic p-value; for random pairs
   also a Mantel permutation p-value that respects the tokens pairs share, on pairs among a
   sub-sample of up to 2,000 tokens). Split by identical vs different token id, because the
   same token routes alike whatever it means: the different-token correlation is what
   geometry explains beyond token identity.
2. Nearest neighbour in hidden space (cosine, among the layer's sampled tokens, excluding
   the token itself) as a predictor of the expert set: its overlap next to a random
   neighbour drawn from the same candidates and to chance k/E. Candidates: any token,
   tokens with a different id (geometry beyond identity), tokens with the same id (context
   beyond identity; the random same-id neighbour is the token-identity predictor).
3. The mean hidden direction u = μ/|μ|: the share of the hidden states' second moment it
   carries, E[(h·u)²]/E|h|² (chance for a random direction: exactly 1/H), and |μ|²/E|h|²;
   with router weights W (E×H): mean |cos(w_e, u)| of router rows and of centred rows
   w_e − mean_e(w) (softmax ignores what all experts share), next to the exact mean |cos|
   of a random direction, Γ(H/2)/(√π Γ((H+1)/2)) ≈ sqrt(2/(πH)); and the mean direction's
   share of the across-expert logit variance, Var_e(Wμ) / E_t Var_e(W h_t), next to what an
   isotropic router would give (|μ|²/E|h|²): far below it means the router ignores the mean.
4. Per-sequence expert visit frequencies (all tokens, not just sampled ones; see
   :mod:`moescope.analysis.geometry_visits`): cosine of the visit vectors of a sequence's
   even and odd positions (within) vs of different sequences (across), against multinomial
   chance with uniform and with the layer's actual loads; with generated tokens, cosine of
   a sequence's prompt and rollout visit vectors.

Every measure is reported for all tokens and, when the trace has generated tokens,
separately for prompt and generated tokens (prefill and decode are never pooled there).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

import numpy as np

from moescope.analysis import routing_sets as rs
from moescope.analysis.geometry_visits import LayerVisits, prompt_vs_rollout, visit_measures
from moescope.analysis.result import AnalysisResult

__all__ = ["GeometryParams", "LayerTokens", "LayerVisits", "analyze_geometry", "mean_direction",
           "mantel_test", "neighbour_measures", "pair_measures", "random_direction_abs_cos"]


@dataclass(frozen=True)
class GeometryParams:
    """Sizes and seeds of the geometry analysis (memory and time are bounded by these).

    Attributes:
        pairs: token pairs sampled per layer and kind (random / same token id).
        top_p: probability mass of the top-p expert sets (Jaccard; needs router_probs).
        seed: seed of every sample drawn here.
        max_tokens: sampled tokens per layer loaded with their hidden states.
        nn_queries: query tokens of the nearest-neighbour predictor per layer.
        min_visit_tokens: tokens a sequence half needs to enter the visit-frequency cosine.
        max_sequences: sequences per layer in the visit-frequency cosine.
        cosine_bins: quantile bins of hidden cosine for the overlap-vs-cosine curve.
        permutations: token relabellings of the Mantel permutation p-value (random pairs).
        random_routers: random (isotropic Gaussian) routers of the mean-direction null (None:
            enough for a Holm-adjusted p of 0.01 across the layers, at least 99; see
            :meth:`resolved`).
    """

    pairs: int = 20_000
    top_p: float = 0.8
    seed: int = 0
    max_tokens: int = 20_000
    nn_queries: int = 2_000
    min_visit_tokens: int = 4
    max_sequences: int = 2_000
    cosine_bins: int = 10
    permutations: int = 99
    random_routers: int | None = None

    def resolved(self, n_layers: int) -> "GeometryParams":
        """These parameters with random_routers set: n_layers / 0.01 - 1 (at least 99) when None
        (n_layers: the layers whose mean-direction p-values are Holm-adjusted together)."""
        from dataclasses import replace

        from moescope.inference import holm_ready_draws

        if self.random_routers is not None:
            return self
        return replace(self, random_routers=holm_ready_draws(n_layers, minimum=99))


@dataclass
class LayerTokens:
    """One MoE layer's sampled tokens, rows aligned across arrays.

    hidden: (n, H) router inputs; experts: (n, k) ids; probs: (n, E) router probabilities or
    None; token_id: (n,) or None when the trace has no tokens table; generated: (n,) bool.
    """

    layer: int
    seq_id: np.ndarray
    pos: np.ndarray
    token_id: np.ndarray | None
    generated: np.ndarray
    experts: np.ndarray
    hidden: np.ndarray
    probs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.seq_id)

    def subset(self, mask: np.ndarray) -> "LayerTokens":
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return replace(self, seq_id=self.seq_id[mask], pos=self.pos[mask], token_id=pick(self.token_id),
                       generated=self.generated[mask], experts=self.experts[mask], hidden=self.hidden[mask],
                       probs=pick(self.probs))


def _ci(x: np.ndarray) -> list[float] | None:
    """95% normal-approximation confidence interval of the mean of x."""
    if len(x) < 2:
        return None
    half = 1.96 * float(np.std(x, ddof=1)) / math.sqrt(len(x))
    return [float(np.mean(x)) - half, float(np.mean(x)) + half]


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman rho and its analytic two-sided p-value (nan when either side is constant)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def _unit(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, dtype=np.float32)
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)


# -- 1. pairs ----------------------------------------------------------------------------------
def pair_measures(tok: LayerTokens, n_experts: int, top_k: int, params: GeometryParams,
                  rng: np.random.Generator) -> dict[str, Any]:
    """Per pair kind (random, diff_token, same_token): mean cosine, overlap, Hamming, top-p
    Jaccard (with size-matched chance) and Spearman(cosine, similarity); plus the mean
    overlap per quantile bin of cosine (random pairs)."""
    n = len(tok)
    # never more pairs than distinct pairs exist (small samples would only repeat them)
    kinds = {"random": rs.random_pairs(n, min(params.pairs, n * (n - 1) // 2), rng)}
    if tok.token_id is not None:
        i, j = kinds["random"]
        same = tok.token_id[i] == tok.token_id[j]
        kinds["diff_token"] = (i[~same], j[~same])
        sizes = np.unique(tok.token_id, return_counts=True)[1]
        n_same = int((sizes * (sizes - 1) // 2).sum())
        kinds["same_token"] = rs.same_value_pairs(tok.token_id, min(params.pairs, n_same), rng)
    unit = _unit(tok.hidden)
    # the shared mean direction inflates every cosine without moving a router that ignores it
    unit_centred = _unit(tok.hidden - tok.hidden.mean(axis=0, keepdims=True))
    members = rs.top_p_members(tok.probs, params.top_p) if tok.probs is not None else None
    out: dict[str, Any] = {}
    for kind, (a, b) in kinds.items():
        rec: dict[str, Any] = {"n_pairs": int(len(a))}
        if len(a) < 3:
            out[kind] = rec
            continue
        cos = np.einsum("ij,ij->i", unit[a], unit[b])
        inter = rs.intersections(tok.experts[a], tok.experts[b])
        overlap = inter / top_k
        rho, p = _spearman(cos, overlap)
        cos_c = np.einsum("ij,ij->i", unit_centred[a], unit_centred[b])
        rec.update(cosine=float(cos.mean()), overlap=float(overlap.mean()),
                   cosine_centred=float(cos_c.mean()), spearman_overlap_centred=_spearman(cos_c, overlap)[0],
                   hamming=float(rs.hamming_similarity(inter, top_k, n_experts).mean()),
                   share_at_least_one=float((inter > 0).mean()),
                   spearman_overlap=rho, spearman_overlap_p=p)
        if members is not None:
            jac = rs.jaccard(members[a], members[b])
            sizes = members.sum(axis=1)
            rho_j, p_j = _spearman(cos, jac)
            rec.update(jaccard_top_p=float(jac.mean()),
                       jaccard_top_p_chance=float(rs.jaccard_chance(sizes[a], sizes[b], n_experts).mean()),
                       top_p_set_size=float(sizes[np.r_[a, b]].mean()),
                       spearman_jaccard=rho_j, spearman_jaccard_p=p_j)
        if kind == "random":
            rec["mantel_rho"], rec["spearman_overlap_mantel_p"] = mantel_test(
                unit, tok.experts, params.pairs, params.permutations, rng)
            rec["by_cosine"] = _binned(cos, overlap, params.cosine_bins)
        out[kind] = rec
    return out


def _standard_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (ties averaged) centred and scaled to unit norm: their dot product is Spearman's rho."""
    from scipy.stats import rankdata

    r = rankdata(x)
    r -= r.mean()
    # elementwise sums rather than BLAS: a threaded BLAS call on a 1-D vector costs more than it computes
    return r / max(float(np.sqrt((r * r).sum())), 1e-12)


def mantel_test(unit: np.ndarray, experts: np.ndarray, n_pairs: int, permutations: int,
                rng: np.random.Generator, max_tokens: int = 2_000) -> tuple[float, float | None]:
    """Spearman(cosine, overlap) over random pairs of up to `max_tokens` tokens, and its
    permutation p-value that respects shared tokens (a Mantel test).

    Pairs share tokens, so they are not independent and the analytic p-value is too small;
    reassigning hidden vectors to tokens at random keeps that dependence under the null. The
    tokens are a sub-sample so that one Gram matrix (max_tokens² cosines) serves every permutation.
    """
    if permutations <= 0 or len(unit) < 3:
        return float("nan"), None
    sub = rng.choice(len(unit), size=min(len(unit), max_tokens), replace=False)
    m = len(sub)
    a, b = rs.random_pairs(m, min(n_pairs, m * (m - 1) // 2), rng)
    gram = unit[sub] @ unit[sub].T
    overlap = _standard_ranks(rs.intersections(experts[sub[a]], experts[sub[b]]).astype(np.float64))
    if not np.any(overlap):
        return float("nan"), None  # constant routing similarity: no correlation to test
    rho = float((_standard_ranks(gram[a, b]) * overlap).sum())
    hits = 0
    for _ in range(permutations):
        perm = rng.permutation(m)
        hits += abs(float((_standard_ranks(gram[perm[a], perm[b]]) * overlap).sum())) >= abs(rho) - 1e-12
    return rho, (1 + hits) / (1 + permutations)


def _binned(x: np.ndarray, y: np.ndarray, bins: int) -> dict[str, list[float]]:
    """Mean x and mean y per quantile bin of x (the overlap-vs-cosine curve)."""
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, max(len(edges) - 2, 0))
    counts = np.bincount(which, minlength=len(edges) - 1)
    keep = counts > 0
    mx = np.bincount(which, weights=x, minlength=len(counts))[keep] / counts[keep]
    my = np.bincount(which, weights=y, minlength=len(counts))[keep] / counts[keep]
    return {"cosine": mx.tolist(), "overlap": my.tolist()}


# -- 2. nearest neighbours -------------------------------------------------------------------------
def neighbour_measures(tok: LayerTokens, top_k: int, params: GeometryParams,
                       rng: np.random.Generator, chunk: int = 256) -> dict[str, Any]:
    """Per candidate set (any, diff_token, same_token): mean overlap of the query's expert set
    with its nearest hidden-space neighbour's, with a random candidate's, their paired
    difference (95% CI), and the neighbours' mean cosine."""
    n = len(tok)
    if n < 3:
        return {}
    queries = rng.choice(n, size=min(params.nn_queries, n), replace=False)
    unit = _unit(tok.hidden)
    kinds = ["any"] + (["diff_token", "same_token"] if tok.token_id is not None else [])
    got: dict[str, list[list[np.ndarray]]] = {k: [[], [], []] for k in kinds}
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        sims = unit[q] @ unit.T  # (c, n) cosines
        not_self = np.ones_like(sims, dtype=bool)
        not_self[np.arange(len(q)), q] = False
        same = tok.token_id[q][:, None] == tok.token_id[None, :] if tok.token_id is not None else None
        for kind in kinds:
            allowed = not_self if kind == "any" else not_self & (same if kind == "same_token" else ~same)
            has = allowed.any(axis=1)
            nearest = np.where(allowed, sims, -np.inf).argmax(axis=1)
            # a uniform random allowed candidate: argmax of uniform noise over allowed entries
            randomly = np.where(allowed, rng.random(sims.shape, dtype=np.float32), -1.0).argmax(axis=1)
            qe = tok.experts[q[has]]
            got[kind][0].append(rs.intersections(qe, tok.experts[nearest[has]]) / top_k)
            got[kind][1].append(rs.intersections(qe, tok.experts[randomly[has]]) / top_k)
            got[kind][2].append(sims[np.flatnonzero(has), nearest[has]])
    out = {}
    for kind, (nn, rnd, cos) in got.items():
        nn, rnd, cos = np.concatenate(nn), np.concatenate(rnd), np.concatenate(cos)
        out[kind] = {"n_queries": int(len(nn)),
                     "nn_overlap": float(nn.mean()) if len(nn) else None,
                     "random_overlap": float(rnd.mean()) if len(rnd) else None,
                     "difference_ci95": _ci(nn - rnd),
                     "nn_cosine": float(cos.mean()) if len(cos) else None}
    return out


# -- 3. mean direction and router alignment --------------------------------------------------------
def random_direction_abs_cos(dim: int) -> float:
    """Exact E|cos| between a fixed and a uniform random direction in R^dim (≈ sqrt(2/(π dim)))."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


def _router_shares(centred: np.ndarray, mu: np.ndarray, cov: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For routers (R, E, H) with rows centred over experts: the mean direction's share of the
    across-expert logit variance, Var_e(Wμ) / E_t Var_e(W h_t), and mean_e |cos(w_e, u)|."""
    mean_var = np.einsum("reh,h->re", centred, mu) ** 2
    residual = np.einsum("reh,hk,rek->re", centred, cov, centred, optimize=True)
    share = mean_var.sum(axis=1) / np.maximum(mean_var.sum(axis=1) + residual.sum(axis=1), 1e-30)
    norms = np.maximum(np.linalg.norm(centred, axis=2), 1e-12)
    return share, (np.abs(np.einsum("reh,h->re", centred, u)) / norms).mean(axis=1)


_ROUTER_BATCH = 64  # random routers drawn at once (64 x 128 experts x 4,096 hidden: 1 GB of float64)


def mean_direction(hidden: np.ndarray, router: np.ndarray | None = None, *, random_routers: int = 99,
                   rng: np.random.Generator | None = None) -> dict[str, Any]:
    """The mean hidden direction's share of the second moment, and the router's alignment with it.

    With `router` (E, H): its centred rows' mean |cos| with the mean direction and the mean
    direction's share of the across-expert logit variance, each tested against
    `random_routers` isotropic Gaussian routers of the same shape on the same hidden states
    (null mean, SD and one-sided permutation p-values: "the router is blinder to the mean
    than a random router", (1 + #random <= real) / (1 + n), and "more aligned", >=)."""
    h = np.asarray(hidden, dtype=np.float64)
    dim = h.shape[1]
    mu = h.mean(axis=0)
    second = float((h * h).sum(axis=1).mean())
    u = mu / max(np.linalg.norm(mu), 1e-12)
    out: dict[str, Any] = {
        "hidden_size": dim,
        "mean_norm_share": float(mu @ mu / second),
        "mean_direction_share": float(((h @ u) ** 2).mean() / second),
        "mean_direction_share_chance": 1.0 / dim,
        "mean_cosine_to_mean": float((_unit(h) @ u).mean()),
    }
    if router is None:
        return out
    w = np.asarray(router, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != dim:
        out["router_note"] = f"router weights of shape {tuple(w.shape)} do not match hidden size {dim}; skipped"
        return out
    centred = w - w.mean(axis=0, keepdims=True)
    cos_rows = np.abs(w @ u) / np.maximum(np.linalg.norm(w, axis=1), 1e-12)
    cos_centred = np.abs(centred @ u) / np.maximum(np.linalg.norm(centred, axis=1), 1e-12)
    # Var_e(W x) = |W_c x|² / E with W_c the rows centred over experts, so both variances come
    # from the (H, H) covariance of h: no (tokens × experts) logit matrix is ever built
    cov = np.cov(h, rowvar=False, bias=True).reshape(dim, dim)
    mean_var = float((centred @ mu) @ (centred @ mu)) / len(w)
    residual_var = float(np.einsum("ij,jk,ik->", centred, cov, centred)) / len(w)  # E_t Var_e(W(h_t − μ))
    share = mean_var / max(mean_var + residual_var, 1e-30)
    out.update(
        router_abs_cos=float(cos_rows.mean()),
        router_centred_abs_cos=float(cos_centred.mean()),
        router_abs_cos_chance=random_direction_abs_cos(dim),
        router_mean_logit_share=share,
        router_mean_logit_share_isotropic=out["mean_norm_share"],
    )
    if random_routers > 0:
        from moescope.inference import permutation_p_value

        rng = rng or np.random.default_rng(0)
        shares, coses = [], []
        for lo in range(0, random_routers, _ROUTER_BATCH):  # (R, E, H) normals a batch at a time
            draws = rng.standard_normal((min(_ROUTER_BATCH, random_routers - lo), w.shape[0], dim))
            share_b, cos_b = _router_shares(draws - draws.mean(axis=1, keepdims=True), mu, cov, u)
            shares.append(share_b)
            coses.append(cos_b)
        null_share, null_cos = np.concatenate(shares), np.concatenate(coses)
        out.update(
            router_mean_logit_share_null_mean=float(null_share.mean()),
            router_mean_logit_share_null_sd=float(null_share.std(ddof=1)),
            router_mean_logit_share_p_lower=permutation_p_value(-share, -null_share),
            router_mean_logit_share_p_upper=permutation_p_value(share, null_share),
            router_centred_abs_cos_null_mean=float(null_cos.mean()),
            router_centred_abs_cos_null_sd=float(null_cos.std(ddof=1)),
            random_routers=int(random_routers),
        )
    return out


# -- the analysis ------------------------------------------------------------------------------------
def token_measures(tok: LayerTokens, n_experts: int, top_k: int, params: GeometryParams,
                   rng: np.random.Generator, router: np.ndarray | None) -> dict[str, Any]:
    """Pairs, nearest neighbours and mean direction of one layer's (subset of) tokens."""
    # the random routers draw from their own stream: the other measures' samples do not depend
    # on how many there are
    router_rng = np.random.default_rng(int(rng.integers(2 ** 63)))
    return {"n_tokens": int(len(tok)),
            "pairs": pair_measures(tok, n_experts, top_k, params, rng) if len(tok) >= 3 else {},
            "neighbours": neighbour_measures(tok, top_k, params, rng),
            "mean_direction": mean_direction(tok.hidden, router, random_routers=params.random_routers, rng=router_rng)
            if len(tok) >= 2 else {}}


def analyze_geometry(
    layers: Iterable[tuple[LayerTokens, LayerVisits | None]],
    *,
    n_experts: int,
    top_k: int,
    router_weights: dict[int, np.ndarray] | None = None,
    params: GeometryParams | None = None,
    trace: str | None = None,
    notes: list[str] | None = None,
) -> AnalysisResult:
    """Run every geometry measure layer by layer (one layer in memory at a time).

    `layers` yields each MoE layer's sampled tokens and its visit counts; `router_weights`
    maps layer -> (E, H) router matrix (optional). Returns an AnalysisResult whose values hold
    `per_layer` (all tokens), `by_phase` (prompt / generated, or None without generated tokens),
    `visits`, per-layer summary series and the chance levels.
    """
    # the mean-direction test is Holm-adjusted over the layers with router weights
    params = (params or GeometryParams()).resolved(max(len(router_weights or {}), 1))
    rng = np.random.default_rng(params.seed)
    notes = list(notes or [])
    per_layer, by_phase, visits = [], {"prompt": [], "generated": []}, []
    has_generated = has_probs = has_tokens = False
    for tok, vis in layers:
        router = (router_weights or {}).get(tok.layer)
        has_generated |= bool(tok.generated.any())
        has_probs |= tok.probs is not None
        has_tokens |= tok.token_id is not None
        per_layer.append({"layer": tok.layer, **token_measures(tok, n_experts, top_k, params, rng, router)})
        for phase, flag in (("prompt", False), ("generated", True)) if tok.generated.any() else ():
            by_phase[phase].append({"layer": tok.layer, **token_measures(tok.subset(tok.generated == flag), n_experts,
                                                                         top_k, params, rng, router)})
        if vis is not None:
            entry = {"layer": vis.layer, "all": visit_measures(vis, n_experts, params, rng)}
            if vis.generated.any():
                entry["prompt"] = visit_measures(vis, n_experts, params, rng, generated=False)
                entry["generated"] = visit_measures(vis, n_experts, params, rng, generated=True)
                entry["prompt_vs_rollout"] = prompt_vs_rollout(vis, n_experts, rng)
            visits.append(entry)
    _holm_mean_direction(per_layer)
    for phase_layers in by_phase.values():
        _holm_mean_direction(phase_layers)
    if not has_probs:
        notes.append("the trace has no router_probs: top-p Jaccard skipped (capture with --router-scores probs)")
    if not has_tokens:
        notes.append("the trace has no tokens table: the identical / different token id split is skipped")
    if not router_weights:
        notes.append("no router weights given: router alignment with the mean direction skipped (pass --model)")
    values: dict[str, Any] = {
        "n_experts": n_experts, "top_k": top_k, "layers": [e["layer"] for e in per_layer],
        "expected_overlap_chance": rs.expected_overlap_chance(n_experts, top_k),
        "share_at_least_one_chance": rs.share_at_least_one_chance(n_experts, top_k),
        "hamming_chance": rs.hamming_chance(n_experts, top_k),
        "per_layer": per_layer,
        "by_phase": by_phase if has_generated else None,
        "visits": visits,
        "notes": notes,
    }
    values.update(summary_series(per_layer, visits))
    from moescope.analysis.geometry_plots import geometry_figures

    figures = geometry_figures(values)
    return AnalysisResult("geometry", values, params=asdict(params), figures=figures, trace=trace)


def _holm_mean_direction(per_layer: list[dict[str, Any]]) -> None:
    """Holm-adjust the random-router p-values of the mean direction across layers (in place:
    keys router_mean_logit_share_p_lower_holm / _p_upper_holm)."""
    from moescope.inference import holm

    for side in ("lower", "upper"):
        key = f"router_mean_logit_share_p_{side}"
        ps = [(e.get("mean_direction") or {}).get(key) for e in per_layer]
        adjusted = holm([np.nan if p is None else p for p in ps])
        for e, p, q in zip(per_layer, ps, adjusted):
            if p is not None:
                e["mean_direction"][key + "_holm"] = float(q)


def _get(entry: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def summary_series(per_layer: list[dict[str, Any]], visits: list[dict[str, Any]]) -> dict[str, list]:
    """Top-level per-layer series (one value per MoE layer, in `layers` order) for reports."""
    series = {
        "spearman_cosine_overlap": ("pairs", "random", "spearman_overlap"),
        "spearman_cosine_overlap_diff_token": ("pairs", "diff_token", "spearman_overlap"),
        "spearman_cosine_overlap_same_token": ("pairs", "same_token", "spearman_overlap"),
        "spearman_cosine_jaccard": ("pairs", "random", "spearman_jaccard"),
        "spearman_centred_cosine_overlap": ("pairs", "random", "spearman_overlap_centred"),
        "pair_overlap_random": ("pairs", "random", "overlap"),
        "pair_overlap_same_token": ("pairs", "same_token", "overlap"),
        "pair_overlap_diff_token": ("pairs", "diff_token", "overlap"),
        "jaccard_top_p_random": ("pairs", "random", "jaccard_top_p"),
        "jaccard_top_p_chance": ("pairs", "random", "jaccard_top_p_chance"),
        "nn_overlap": ("neighbours", "any", "nn_overlap"),
        "random_neighbour_overlap": ("neighbours", "any", "random_overlap"),
        "nn_overlap_diff_token": ("neighbours", "diff_token", "nn_overlap"),
        "random_neighbour_overlap_diff_token": ("neighbours", "diff_token", "random_overlap"),
        "nn_overlap_same_token": ("neighbours", "same_token", "nn_overlap"),
        "random_neighbour_overlap_same_token": ("neighbours", "same_token", "random_overlap"),
        "mean_direction_share": ("mean_direction", "mean_direction_share"),
        "mean_direction_share_chance": ("mean_direction", "mean_direction_share_chance"),
        "router_centred_abs_cos": ("mean_direction", "router_centred_abs_cos"),
        "router_abs_cos_chance": ("mean_direction", "router_abs_cos_chance"),
        "router_mean_logit_share": ("mean_direction", "router_mean_logit_share"),
        "router_mean_logit_share_isotropic": ("mean_direction", "router_mean_logit_share_isotropic"),
        "router_mean_logit_share_null_mean": ("mean_direction", "router_mean_logit_share_null_mean"),
        "router_mean_logit_share_null_sd": ("mean_direction", "router_mean_logit_share_null_sd"),
        "router_mean_logit_share_p_lower_holm": ("mean_direction", "router_mean_logit_share_p_lower_holm"),
        "router_mean_logit_share_p_upper_holm": ("mean_direction", "router_mean_logit_share_p_upper_holm"),
    }
    out: dict[str, list] = {key: [_get(e, *path) for e in per_layer] for key, path in series.items()}
    for key, path in {"visit_cosine_within": ("all", "within"), "visit_cosine_across": ("all", "across"),
                      "visit_cosine_uniform_chance": ("all", "uniform_chance"),
                      "visit_cosine_load_chance": ("all", "load_chance")}.items():
        out[key] = [_get(v, *path) for v in visits]
    return out
