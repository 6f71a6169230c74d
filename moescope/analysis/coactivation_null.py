"""Chance levels of expert co-activation under the model's own selection rule.

A random-pairing null (:func:`moescope.analysis.stats.pair_null`) lets any two experts meet.
Routers with selection constraints do not: DeepSeek-style group-limited top-k keeps
`topk_group` of `n_group` expert groups per token and picks the k experts inside them, so
pairs inside a group are far more common than random pairing predicts although nothing but
the rule pairs them. This module builds, for a layer's pair counts and the router's rule,

- the expected counts: random pairing that keeps each expert's number of pairs and, for a
  group-limited rule, the number of pairs between every two groups (what the rule decides);
  for plain top-k this is exactly :func:`moescope.analysis.stats.pair_null`;
- the chance distribution (mean and SD over replicate simulations) of the dispersion, from
  a router with *no* pair structure (independent random scores per expert, logits
  calibrated so that every expert keeps its observed load) that selects by the same rule;
- the chance distribution of the largest pair ratios (rank-matched) from Poisson draws
  around the expected counts, with a permutation-style p-value for the largest ratio.

Units: counts are tokens; ratios are count / expected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moescope.inference import permutation_p_value

_FLOOR_LOGIT = -30.0  # experts with no load: never chosen by the simulated router


def gumbel_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Standard Gumbel noise in float32 as -log(E), E ~ Exp(1) (the same law as rng.gumbel):
    the ziggurat exponential and a float32 log are ~15x cheaper than float64 Gumbel draws, the
    simulation's main cost, and E > 0 so every value is finite."""
    noise = rng.standard_exponential(size=shape, dtype=np.float32)
    np.maximum(noise, np.finfo(np.float32).tiny, out=noise)  # float32 draws can round to 0
    np.log(noise, out=noise)
    np.negative(noise, out=noise)
    return noise


@dataclass(frozen=True)
class SelectionRule:
    """How a router turns per-expert scores into a token's k experts.

    n_group / topk_group: group-limited top-k (None: plain top-k). group_score: how a group
    is scored, "top2_sum" (DeepSeek-V3, Mistral 4, GLM4-MoE) or "max" (DeepSeek-V2's
    group_limited_greedy). Experts are grouped contiguously (group g holds experts
    g*E/n_group ... (g+1)*E/n_group - 1), as in transformers."""

    n_experts: int
    top_k: int
    n_group: int | None = None
    topk_group: int | None = None
    group_score: str = "top2_sum"

    @property
    def grouped(self) -> bool:
        return bool(self.n_group and self.topk_group and self.n_group > 1 and self.topk_group < self.n_group
                    and self.n_experts % self.n_group == 0)

    @classmethod
    def from_model(cls, model: dict[str, Any] | None, n_experts: int, top_k: int) -> SelectionRule:
        """The rule recorded in a manifest's model description (plain top-k when unrecorded)."""
        s = (model or {}).get("router_settings") or {}
        if not s.get("grouped"):
            return cls(n_experts, top_k)
        score = "max" if s.get("topk_method") == "group_limited_greedy" else "top2_sum"
        return cls(n_experts, top_k, int(s["n_group"]), int(s["topk_group"]), score)

    def describe(self) -> str:
        if not self.grouped:
            return f"top-{self.top_k} of {self.n_experts} experts, any pair allowed"
        return (f"group-limited top-{self.top_k}: {self.topk_group} of {self.n_group} groups of "
                f"{self.n_experts // self.n_group} experts kept per token (group score: {self.group_score})")

    def select(self, scores: np.ndarray) -> np.ndarray:
        """(n, E) scores -> (n, k) chosen expert ids (unordered)."""
        k = self.top_k
        if self.grouped:
            n, E = scores.shape
            g = scores.reshape(n, self.n_group, E // self.n_group)
            if self.group_score == "max" or g.shape[2] < 2:
                gscore = g.max(axis=2)
            else:
                gscore = -np.partition(-g, 1, axis=2)[:, :, :2].sum(axis=2)
            drop = np.argpartition(-gscore, self.topk_group - 1, axis=1)[:, self.topk_group:]
            g = g.copy()
            np.put_along_axis(g, drop[:, :, None], -np.inf, axis=1)
            scores = g.reshape(n, E)
        return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def pair_counts(chosen: np.ndarray, n_experts: int) -> np.ndarray:
    """(E, E) tokens choosing both a and b (symmetric; diagonal: tokens choosing a)."""
    E, k = n_experts, chosen.shape[1]
    a, b = np.triu_indices(k, 1)
    codes = chosen[:, a].ravel() * E + chosen[:, b].ravel()
    counts = np.bincount(codes, minlength=E * E).reshape(E, E).astype(np.float64)
    counts = counts + counts.T
    counts[np.diag_indices(E)] = np.bincount(chosen.ravel(), minlength=E)
    return counts


def calibrate_logits(load: np.ndarray, rule: SelectionRule, rng: np.random.Generator, *, tokens: int = 20_000,
                     iterations: int = 40, tolerance: float = 0.02) -> np.ndarray:
    """Per-expert logits whose Gumbel-noised scores, selected by `rule`, give each expert its
    observed share of the assignments (within `tolerance` relative error where reachable).
    Fixed noise across iterations (common random numbers) keeps the fit smooth."""
    load = np.asarray(load, np.float64)
    target = load / max(load.sum(), 1.0)
    with np.errstate(divide="ignore"):
        logit = np.where(target > 0, np.log(np.maximum(target, 1e-300)), _FLOOR_LOGIT)
    noise = gumbel_noise(rng, (tokens, rule.n_experts))
    live = target > 0
    for _ in range(iterations):
        chosen = rule.select(logit.astype(np.float32) + noise)
        sim = np.bincount(chosen.ravel(), minlength=rule.n_experts) / chosen.size
        ok = live & (sim > 0)
        if np.all(np.abs(sim[live] - target[live]) <= tolerance * target[live] + 1.0 / chosen.size):
            break
        logit[ok] += 0.8 * np.log(target[ok] / sim[ok])
        logit[live & (sim == 0)] += 1.0
    return logit


def simulate(logit: np.ndarray, rule: SelectionRule, n_tokens: int, rng: np.random.Generator,
             block: int = 50_000) -> np.ndarray:
    """Pair counts (E, E) of `n_tokens` tokens routed by `rule` on logits + Gumbel noise."""
    total = np.zeros((rule.n_experts, rule.n_experts))
    logit32 = np.asarray(logit, np.float32)
    for start in range(0, n_tokens, block):
        n = min(block, n_tokens - start)
        scores = gumbel_noise(rng, (n, rule.n_experts))
        scores += logit32
        total += pair_counts(rule.select(scores), rule.n_experts)
    return total


def structured_pair_null(rates: np.ndarray, top_k: int, propensity: np.ndarray | None = None, *,
                         iterations: int = 1000) -> np.ndarray:
    """Expected share of tokens choosing both a and b: P_ab = x_a x_b Q_ab with
    x_a * sum_b x_b Q_ab = r_a (k - 1) (each expert keeps its pairs). Q = `propensity` (E, E),
    how often the selection rule lets a and b meet (None: every pair alike, i.e. pair_null)."""
    r = np.asarray(rates, np.float64)
    E = len(r)
    Q = np.ones((E, E)) if propensity is None else np.asarray(propensity, np.float64).copy()
    np.fill_diagonal(Q, 0.0)
    target = r * (top_k - 1)
    x = np.sqrt(np.maximum(target, 0) / max(E - 1, 1))
    for _ in range(iterations):
        rest = Q @ x
        new = np.divide(target, rest, out=np.zeros_like(x), where=rest > 0)
        if np.allclose(new, x, rtol=1e-10, atol=1e-15):
            x = new
            break
        x = 0.5 * (x + new)  # damped: plain iteration can oscillate
    expected = np.outer(x, x) * Q
    np.fill_diagonal(expected, 0.0)
    return expected


def dispersion_values(counts: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> float | None:
    """Mean over pairs expected >= min_expected of (count - expected)^2 / expected."""
    iu = np.triu_indices(len(counts), 1)
    c, e = counts[iu], expected[iu]
    keep = e >= min_expected
    return float(np.mean((c[keep] - e[keep]) ** 2 / e[keep])) if keep.any() else None


def block_pair_null(counts: np.ndarray, n_group: int, *, iterations: int = 2000, tol: float = 1e-9) -> np.ndarray:
    """Expected pair counts (E, E) that keep each expert's number of pairs AND the number of
    pairs between every two expert groups (within a group: g = h), and are otherwise random:
    the maximum-entropy fit M_ab = x_a x_b y_gh (g, h the groups of a and b) by iterative
    proportional fitting. What the group-limited rule decides (which groups a token's
    experts come from) is kept; which experts of those groups meet is left to chance."""
    C = np.asarray(counts, np.float64).copy()
    E = len(C)
    np.fill_diagonal(C, 0.0)
    size = E // n_group
    group = np.arange(E) // size
    onehot = np.eye(n_group)[group]  # (E, G)
    row_target = C.sum(axis=1)
    block_target = onehot.T @ C @ onehot  # (G, G)
    x = np.where(row_target > 0, 1.0, 0.0)
    y = np.where(block_target > 0, 1.0, 0.0)
    off = 1.0 - np.eye(E)
    for _ in range(iterations):
        M = np.outer(x, x) * y[np.ix_(group, group)] * off
        block = onehot.T @ M @ onehot
        y = np.divide(y * block_target, block, out=np.zeros_like(y), where=block > 0)
        M = np.outer(x, x) * y[np.ix_(group, group)] * off
        row = M.sum(axis=1)
        new = np.divide(x * np.sqrt(row_target), np.sqrt(row), out=np.zeros_like(x), where=row > 0)
        if np.allclose(new, x, rtol=tol, atol=0):
            x = new
            break
        x = new
    return np.outer(x, x) * y[np.ix_(group, group)] * off


def expected_pairs(counts: np.ndarray, n_tokens: int, rule: SelectionRule) -> np.ndarray:
    """Expected pair counts under random pairing within the rule: degrees kept (and, for a
    group-limited rule, the pairs between every two groups, :func:`block_pair_null`)."""
    counts = np.asarray(counts, np.float64)
    if rule.grouped:
        return block_pair_null(counts, int(rule.n_group))
    n = max(int(n_tokens), 1)
    return structured_pair_null(np.diag(counts) / n, rule.top_k) * n


@dataclass
class PairNull:
    """The co-activation null of one layer. expected (E, E) counts for the observed tokens;
    dispersion_chance / _sd: mean and SD of the dispersion over `replicates` simulated routers
    with the same loads and selection rule and no pair structure; rule: that selection rule."""

    expected: np.ndarray
    dispersion_chance: float | None
    dispersion_chance_sd: float | None
    replicates: int
    rule: SelectionRule


def pair_null_under_rule(counts: np.ndarray, n_tokens: int, rule: SelectionRule, rng: np.random.Generator, *,
                         chance_tokens: int = 20_000, replicates: int = 20, min_expected: float = 5.0) -> PairNull:
    """Expected pair counts (:func:`expected_pairs`) and the chance dispersion for a layer with
    pair counts `counts` (E, E; diagonal: expert loads) over `n_tokens` tokens.

    The chance dispersion: routers with independent Gumbel scores per expert (logits fitted to
    the observed loads, :func:`calibrate_logits`) selecting by `rule`, min(n_tokens,
    chance_tokens) tokens per replicate (by chance the dispersion does not depend on the
    number of tokens), each scored exactly like the observed counts (same null fitted anew)."""
    n = max(int(n_tokens), 1)
    counts = np.asarray(counts, np.float64)
    expected = expected_pairs(counts, n, rule)
    values = []
    m = min(n, chance_tokens)
    if rule.top_k > 1 and replicates:
        logit = calibrate_logits(np.diag(counts), rule, rng)
        for _ in range(replicates):
            sim = simulate(logit, rule, m, rng)
            d = dispersion_values(sim, expected_pairs(sim, m, rule), min_expected)
            if d is not None:
                values.append(d)
    mean = float(np.mean(values)) if values else None
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return PairNull(expected, mean, sd, len(values), rule)


def beyond_chance(dispersion: float | None, chance: float | None, chance_sd: float | None) -> bool:
    """Whether a dispersion is clearly beyond its simulated chance: more than 3 SD above the
    chance mean AND at least 1.5 times it (the chance distribution is right-skewed and its SD
    comes from 20 replicates, so the SD rule alone flags too often)."""
    if dispersion is None or chance is None:
        return False
    return dispersion > chance + 3 * (chance_sd or 0.0) and dispersion >= 1.5 * chance


def top_ratio_chance(expected: np.ndarray, observed_top: list[float], rng: np.random.Generator, *,
                     draws: int = 200, min_expected: float = 5.0) -> dict[str, Any]:
    """Chance of the largest pair ratios: counts drawn Poisson(expected) per pair (`draws`
    times), ratios count / expected over pairs expected >= min_expected, sorted. Returns the
    mean and SD of the i-th largest chance ratio (i = 1 .. len(observed_top)) and the p-value
    of the largest observed ratio, (1 + #draws whose largest ratio >= it) / (1 + draws).
    (Poisson draws ignore that degrees are fixed, which only widens chance: conservative.)"""
    iu = np.triu_indices(len(expected), 1)
    e = expected[iu]
    e = e[e >= min_expected]
    top = len(observed_top)
    if not len(e) or not top:
        return {"ratio_chance": [], "ratio_chance_sd": [], "max_ratio_p_value": None, "draws": draws}
    sims = rng.poisson(e, size=(draws, len(e))) / e
    k = min(top, len(e))
    best = -np.sort(-sims, axis=1)[:, :k]
    p = permutation_p_value(observed_top[0], best[:, 0])
    return {"ratio_chance": best.mean(axis=0).tolist(), "ratio_chance_sd": best.std(axis=0, ddof=1).tolist(),
            "max_ratio_p_value": p, "draws": draws}
