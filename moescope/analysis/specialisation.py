"""What experts specialise in: normalised mutual information (NMI) between the expert chosen
and a label of the token (its domain, its token type, its token id), against permutation chance.

Study 3 of STUDIES.md (Fan, Messmer & Jaggi 2024) reports that token-level routing gives
experts that specialise by syntax (token types) and sequence-level routing weak topic
(domain) specialisation. The measures here are ours:

- Every one of a token's k choices counts: the contingency table of a layer is
  counts[label, expert] over all (token, choice) pairs, so top-1 and top-2 are comparable.
- NMI = I(label; expert) / ((H(label) + H(expert)) / 2) (the arithmetic normalisation),
  from 0 (independent) to 1 (each determines the other). Units: none (a ratio of bits).
- Chance: NMI of the same routes with the labels permuted, mean over shuffles, and a
  one-sided permutation p-value (share of shuffles reaching the observed value, +1 smoothed).
  The permutation respects how each label is assigned:
  * domain is a property of a sequence: domains are permuted across *sequences*, so that a
    router that fixes one expert per sequence (sequence-level routing) is not credited with
    the many tokens of one sequence as if they were independent;
  * token type and token id are token properties: permuted across all tokens (``global``);
    token types also get a stricter ``within-sequence`` control (permuted among the tokens
    of each sequence), which keeps each sequence's token-type mix and so removes what the
    domain or sequence explains; what remains is syntax specialisation proper.
- Token id has thousands of classes and its raw NMI is biased upward by sampling; the
  shuffled-label mean is subtracted (``corrected``) and both are reported.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

TOKEN_TYPES = ("whitespace", "punctuation", "number", "capitalised", "lowercase", "symbol", "other")
"""Token types, tokenizer-agnostic (classified from the token's decoded text, outer whitespace stripped):

- whitespace: nothing but spaces, tabs, newlines;
- punctuation: prose punctuation only (. , ; : ! ? ' " ( ) - and other Unicode P* characters);
- number: digits, optionally with . , _ separators;
- capitalised: letters only, the first one upper-case (also ALL-CAPS);
- lowercase: letters only, the first one lower-case or uncased (word pieces, most scripts);
- symbol: code-like operators and brackets (= + * / < > [ ] { } | & ^ % ~ # @ \\ ` $ _ and
  Unicode S* characters), alone or mixed with punctuation (``]:``, ``->``, ``==``);
- other: everything else (letters mixed with digits or underscores, undecodable bytes, ...).
"""

_CODE_SYMBOLS = set("=+*/<>[]{}|&^%~#@\\`$_")
_PROSE_PUNCT = set(".,;:!?'\"()-")


def token_type(text: str) -> str:
    """The TOKEN_TYPES class of one token's decoded text."""
    core = text.strip()
    if not core:
        return "whitespace"
    if "\ufffd" in core:  # a byte-level piece of a multi-byte character: no type of its own
        return "other"
    if core.isalpha():
        return "capitalised" if core[0].isupper() else "lowercase"
    if core[0].isdigit() and all(c.isdigit() or c in ".,_" for c in core):
        return "number"
    cats = [unicodedata.category(c) for c in core]
    if all(c in _CODE_SYMBOLS or c in _PROSE_PUNCT or cat[0] in "PS" for c, cat in zip(core, cats)):
        if any(c in _CODE_SYMBOLS or cat[0] == "S" for c, cat in zip(core, cats)):
            return "symbol"
        return "punctuation"
    return "other"


def token_type_codes(texts: Iterable[str]) -> np.ndarray:
    """Index into TOKEN_TYPES of each text (int64 array)."""
    index = {name: i for i, name in enumerate(TOKEN_TYPES)}
    return np.array([index[token_type(t)] for t in texts], dtype=np.int64)


# -- NMI from a contingency table ---------------------------------------------------------------
def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def nmi_from_counts(table: np.ndarray) -> float:
    """NMI of a (labels, experts) contingency table: I / mean(H(label), H(expert)); 0 if either is constant."""
    table = np.asarray(table, dtype=np.float64)
    n = table.sum()
    if n <= 0:
        return float("nan")
    h_label, h_expert = _entropy_bits(table.sum(axis=1)), _entropy_bits(table.sum(axis=0))
    if h_label == 0 or h_expert == 0:
        return 0.0
    mi = h_label + h_expert - _entropy_bits(table.ravel())
    return max(0.0, mi) / ((h_label + h_expert) / 2)


def contingency(experts: np.ndarray, labels: np.ndarray, n_labels: int, n_experts: int) -> np.ndarray:
    """counts[label, expert] over every (token, choice) pair; experts is (N, k), labels (N,).

    Expert ids outside [0, n_experts) (e.g. dropped slots) are ignored.
    """
    experts = np.asarray(experts, dtype=np.int64).reshape(len(labels), -1)
    lab = np.repeat(np.asarray(labels, dtype=np.int64), experts.shape[1])
    ex = experts.ravel()
    ok = (ex >= 0) & (ex < n_experts)
    flat = np.bincount(lab[ok] * n_experts + ex[ok], minlength=n_labels * n_experts)
    return flat.reshape(n_labels, n_experts)


def _dense(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..m-1 (token ids are sparse in a large vocabulary)."""
    return np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.int64)


# -- permutations -------------------------------------------------------------------------------
SHUFFLES = ("global", "between-sequences", "within-sequence")


def permute(labels: np.ndarray, groups: np.ndarray | None, mode: str, rng: np.random.Generator) -> np.ndarray:
    """A permuted copy of token `labels`.

    mode "global": across all tokens; "between-sequences": whole groups swap labels (labels must
    be constant within a group, e.g. the domain of a sequence); "within-sequence": among the
    tokens of each group.
    """
    labels = np.asarray(labels)
    if mode == "global":
        return rng.permutation(labels)
    if groups is None:
        raise ValueError(f"shuffle mode {mode!r} needs groups (sequence ids)")
    group_idx = np.unique(groups, return_inverse=True)[1]
    if mode == "between-sequences":
        _, first = np.unique(group_idx, return_index=True)
        per_group = labels[first]  # the label of each group (constant within it)
        return rng.permutation(per_group)[group_idx]
    if mode == "within-sequence":
        order = np.argsort(group_idx, kind="stable")  # token positions grouped
        shuffled = np.lexsort((rng.random(len(labels)), group_idx))  # same groups, random order inside
        out = np.empty_like(labels)
        out[order] = labels[shuffled]
        return out
    raise ValueError(f"unknown shuffle mode {mode!r}; one of {', '.join(SHUFFLES)}")


@dataclass(frozen=True)
class NmiTest:
    """Observed NMI next to its permutation chance.

    Attributes:
        nmi: observed NMI (0..1).
        chance: mean NMI over label shuffles (the chance level).
        chance_sd: its standard deviation over shuffles.
        p_value: (1 + shuffles with NMI >= observed) / (1 + shuffles), one-sided.
    The property `excess` = nmi - chance (for the token id: the bias-corrected NMI).
    """

    nmi: float
    chance: float
    chance_sd: float
    p_value: float

    @property
    def excess(self) -> float:
        return self.nmi - self.chance

    def as_dict(self) -> dict[str, float]:
        return {"nmi": self.nmi, "chance": self.chance, "chance_sd": self.chance_sd,
                "p_value": self.p_value, "excess": self.excess}


def _test(observed: float, null: np.ndarray) -> NmiTest:
    if len(null) == 0:
        return NmiTest(observed, float("nan"), float("nan"), float("nan"))
    from moescope.inference import permutation_p_value

    return NmiTest(observed, float(null.mean()), float(null.std()), permutation_p_value(observed, null))


def nmi_tests(experts: np.ndarray, labels: np.ndarray, n_experts: int, *, groups: np.ndarray | None = None,
              mode: str = "global", shuffles: int = 20, seed: int = 0) -> tuple[list[NmiTest], NmiTest]:
    """NMI per layer and of the layer mean, each against `shuffles` label permutations of `mode`.

    experts: (L, N, k) expert ids of the same N tokens at L layers; labels: (N,). Each shuffle
    permutes the labels once for all layers, so the layer-mean test is a proper permutation test.
    Returns ([per-layer NmiTest], NmiTest of the mean over layers).
    """
    experts = np.asarray(experts)
    labels = _dense(labels)
    n_labels = int(labels.max()) + 1 if len(labels) else 1

    def per_layer(lab: np.ndarray) -> np.ndarray:
        return np.array([nmi_from_counts(contingency(layer, lab, n_labels, n_experts)) for layer in experts])

    observed = per_layer(labels)
    rng = np.random.default_rng(seed)
    null = np.array([per_layer(permute(labels, groups, mode, rng)) for _ in range(shuffles)]).reshape(shuffles, len(experts))
    layers = [_test(float(observed[i]), null[:, i]) for i in range(len(observed))]
    return layers, _test(float(observed.mean()), null.mean(axis=1))


def vocabulary_routing(experts: np.ndarray, token_id: np.ndarray, sequence: np.ndarray, n_experts: int,
                       seed: int = 0) -> np.ndarray:
    """The vocabulary-only control router: every token sent, at each layer, to the k experts its
    token id is sent to most often *in the other half of the sequences* (cross-fitted, so a
    token id seen once cannot copy its own routing; ids the other half never saw get the
    layer's k most used experts, which carry no information). A function of the token id
    alone: its domain NMI is what the domains' different vocabularies give without any topic
    specialisation. experts (L, N, k) -> (L, N, k)."""
    experts = np.asarray(experts, dtype=np.int64)
    ids = _dense(token_id)
    n_ids = int(ids.max()) + 1 if len(ids) else 1
    seqs, seq_idx = np.unique(sequence, return_inverse=True)
    half = np.random.default_rng(seed).permutation(len(seqs)) % 2
    fold = half[seq_idx] if len(seqs) > 1 else np.arange(len(ids)) % 2
    k = experts.shape[2]
    out = np.empty_like(experts)
    for li, layer in enumerate(experts):
        overall = np.argsort(-contingency(layer, np.zeros(len(ids), np.int64), 1, n_experts)[0], kind="stable")[:k]
        for f in (0, 1):
            fit, apply = fold != f, fold == f
            table = contingency(layer[fit], ids[fit], n_ids, n_experts)  # (ids, E) from the other half
            top = np.argsort(-table, axis=1, kind="stable")[:, :k]
            top[table.sum(axis=1) == 0] = overall
            out[li, apply] = top[ids[apply]]
    return out


# -- all measures -------------------------------------------------------------------------------
def specialisation(experts: np.ndarray, *, domain: np.ndarray, token_type: np.ndarray, token_id: np.ndarray,
                   sequence: np.ndarray, n_experts: int, shuffles: int = 20, seed: int = 0) -> dict[str, dict]:
    """Every specialisation measure, per layer and as the mean over layers, each with its chance level.

    Arguments are per token: experts (L, N, k) for L layers; the token's domain, TOKEN_TYPES
    code, token id and sequence id, (N,) each. Returns {measure: {"layers": [NmiTest dict],
    "mean": NmiTest dict}} for measure in
    - "domain" (shuffled between sequences),
    - "token_type" (shuffled globally),
    - "token_type_within_sequence" (the same NMI, shuffled within each sequence: the control
      for what the sequence's domain / token mix explains),
    - "token_id" (shuffled globally; its "excess" is the bias-corrected NMI),
    - "domain_vocabulary_control": domain NMI of :func:`vocabulary_routing` (the same tokens
      routed by their token id alone), shuffled between sequences with the same permutations
      as "domain": the domain NMI that vocabulary differences between domains explain.
    """
    plan = {"domain": (experts, domain, "between-sequences", 0), "token_type": (experts, token_type, "global", 1),
            "token_type_within_sequence": (experts, token_type, "within-sequence", 2),
            "token_id": (experts, token_id, "global", 3),
            "domain_vocabulary_control": (vocabulary_routing(experts, token_id, sequence, n_experts, seed), domain,
                                          "between-sequences", 0)}
    out = {}
    for name, (routes, labels, mode, offset) in plan.items():
        layers, mean = nmi_tests(routes, labels, n_experts, groups=sequence, mode=mode, shuffles=shuffles,
                                 seed=seed + offset)
        out[name] = {"layers": [t.as_dict() for t in layers], "mean": mean.as_dict()}
    return out


def expert_profile(experts: np.ndarray, labels: np.ndarray, names: Sequence[str], n_experts: int,
                   top: int = 2) -> list[list[tuple[str, float]]]:
    """Per expert, its `top` labels by lift = P(label | expert) / P(label) (1 = chance), most lifted first.

    `labels` index into `names`; experts that received nothing get an empty list.
    """
    table = contingency(experts, labels, len(names), n_experts).astype(np.float64)
    overall = table.sum(axis=1) / max(table.sum(), 1)
    out = []
    for e in range(n_experts):
        col = table[:, e]
        if col.sum() == 0:
            out.append([])
            continue
        lift = np.where(overall > 0, (col / col.sum()) / np.where(overall > 0, overall, 1), 0.0)
        order = np.argsort(-lift, kind="stable")[:top]
        out.append([(str(names[i]), round(float(lift[i]), 3)) for i in order if col[i] > 0])
    return out


def specialises_by(spec: dict[str, dict], alpha: float = 0.05) -> str:
    """Which label the experts follow more (ours), from the layer means of :func:`specialisation`.

    Token types qualify when their NMI beats both the global and the within-sequence shuffles
    (p <= alpha) and are scored by their NMI above the *within-sequence* chance (what the
    sequence's domain and token mix do not explain). Domains qualify when theirs beats the
    between-sequence shuffles and exceeds the vocabulary-only control router's domain NMI
    ("domain_vocabulary_control", when measured), and are scored by their excess over that
    control. Of those that qualify, the larger score wins. Returns "token types", "domains"
    or "neither".
    """
    tt, within, dom = spec["token_type"]["mean"], spec["token_type_within_sequence"]["mean"], spec["domain"]["mean"]
    vocab = (spec.get("domain_vocabulary_control") or {}).get("mean")
    candidates = []
    if tt["p_value"] <= alpha and within["p_value"] <= alpha and within["excess"] > 0:
        candidates.append((within["excess"], "token types"))
    dom_score = dom["excess"] - (vocab["excess"] if vocab else 0.0)
    if dom["p_value"] <= alpha and dom["excess"] > 0 and dom_score > 0:
        candidates.append((dom_score, "domains"))
    return max(candidates)[1] if candidates else "neither"
