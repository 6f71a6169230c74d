"""The design-choice experiment (study 3, Fan, Messmer & Jaggi 2024): train a grid of MoE
variants at a small budget and measure their perplexity and what their experts specialise in.

    OUT/variants/<name>/        one training run per variant (train() layout; resumable)
    OUT/variants/<name>/specialisation.json   the variant's measured routing (cached)
    OUT/results.json, OUT/figures/            written by the command (moescope.analysis.design_choices)

Grid: routing {token, sequence} x top-k {1, 2} x router {learned, frozen} x seeds. Every
variant shares the base config (model size, data, optimiser, token budget); only the three
design choices and the seed change. A variant whose run finished is not trained again, and its
measurement is reused when the measurement settings are unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from moescope.errors import MoescopeError
from moescope.train.config import ROUTERS, ROUTINGS, TrainConfig, config_from_dict

TOP_KS = (1, 2)
# Seeds run when none are given: several, so that every comparison has a spread. The micro
# preset keeps one (a smoke test; tests pass more explicitly when they need a spread).
DEFAULT_SEEDS = {"default": (0, 1, 2), "quick": (0,)}

# Base configs. "default" fits the 8-variant grid in at most an hour on 2 CPU cores: measured
# 1,700-2,300 training tokens/s with one thread while the other core was busy, i.e. about 60 min
# for the grid on one core (docs/analyses/design-choices.md). "quick" is the micro model for
# tests and smoke runs (a few seconds per variant).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "name": "design-choices",
        "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "n_experts": 8,
                  "top_k": 2, "expert_size": 256, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
        "data": {"seq_len": 128, "eval_tokens_per_domain": 8192},
        "optim": {"lr": 0.003, "batch_size": 16, "max_tokens": 800_000, "warmup_steps": 40},
        "eval_every": 200, "checkpoint_every": 100,
    },
    "quick": {
        "name": "design-choices-quick",
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "n_experts": 4,
                  "top_k": 2, "expert_size": 64, "aux_loss_coef": 0.01},
        "data": {"seq_len": 64, "eval_tokens_per_domain": 512},
        "optim": {"lr": 0.003, "batch_size": 8, "max_tokens": 8 * 64 * 30, "warmup_steps": 5},
        "eval_every": 1_000_000, "checkpoint_every": 1_000_000,  # only the final evaluation and checkpoint
    },
}


@dataclass(frozen=True)
class Measurement:
    """How specialisation is measured on each trained variant.

    Attributes:
        tokens_per_domain: validation tokens per domain routed through the model (whole windows of seq_len).
        shuffles: label permutations for every chance level.
        batch_size: windows per forward pass.
        seed: seed of the permutations.
    """

    tokens_per_domain: int = 4096
    shuffles: int = 99  # the smallest attainable permutation p-value is 1 / (1 + shuffles)
    batch_size: int = 16
    seed: int = 0
    version: int = 2  # of the measures: 2 added the vocabulary control (older caches are re-measured)


MEASUREMENTS = {"default": Measurement(), "quick": Measurement(tokens_per_domain=512, shuffles=19)}


@dataclass(frozen=True)
class Variant:
    """One cell of the grid, with its seed."""

    routing: str
    top_k: int
    router: str
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.routing}-top{self.top_k}-{self.router}-s{self.seed}"


def grid(routings: tuple[str, ...] = ROUTINGS, top_ks: tuple[int, ...] = TOP_KS,
         routers: tuple[str, ...] = ROUTERS, seeds: tuple[int, ...] = (0,)) -> list[Variant]:
    """Every combination, in a stable order (routing, top-k, router, seed); checks the choices."""
    for name, values, allowed in (("routing", routings, ROUTINGS), ("router", routers, ROUTERS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise MoescopeError(f"--{name} takes a comma-separated subset of {','.join(allowed)}, not {','.join(values)!r}")
    if not top_ks or any(k < 1 for k in top_ks) or not seeds:
        raise MoescopeError("--top-k and --seeds need at least one value, top-k values of 1 or more")
    return [Variant(r, k, ro, s) for r in routings for k in top_ks for ro in routers for s in seeds]


def base_config(preset: str, corpus: str | Path, *, max_tokens: int | None = None,
                threads: int | None = None) -> TrainConfig:
    """The shared TrainConfig of a preset ("default" or "quick") on `corpus` (stored as an absolute path)."""
    cfg = config_from_dict(json.loads(json.dumps(PRESETS[preset])))
    cfg = cfg.replace(data={"corpus": str(Path(corpus).resolve())}, threads=threads)
    if max_tokens is not None:
        if max_tokens < cfg.tokens_per_step:
            raise MoescopeError(f"--max-tokens must be at least one batch ({cfg.tokens_per_step} tokens)")
        cfg = cfg.replace(optim={"max_tokens": max_tokens})
    return cfg


def variant_config(base: TrainConfig, variant: Variant) -> TrainConfig:
    """`base` with the variant's routing, top-k, router and seed."""
    if variant.top_k > base.model.n_experts:
        raise MoescopeError(f"top-k {variant.top_k} exceeds the model's {base.model.n_experts} experts")
    return base.replace(model={"routing": variant.routing, "top_k": variant.top_k, "router": variant.router},
                        seed=variant.seed, name=f"{base.name}-{variant.name}")


# -- training ---------------------------------------------------------------------------------
def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as config.yaml holds it (tuples become lists), minus what does not change the
    result (threads), for comparing with the run already in a directory."""
    plain = yaml.safe_load(yaml.safe_dump(json.loads(json.dumps(config))))
    plain.pop("threads", None)
    return plain


def train_variant(cfg: TrainConfig, run_dir: Path, on_step: Callable[[int, int, dict], None] | None = None
                  ) -> tuple[dict[str, Any], bool]:
    """Train one variant into run_dir unless a run of the same config finished there.

    Returns (the run's result.json: steps, tokens, seconds (training wall time, s), final_eval,
    parameters; whether it was trained now). A run of another config in run_dir is refused.
    """
    from moescope.train.trainer import train

    saved = run_dir / "config.yaml"
    if saved.exists() and _comparable(yaml.safe_load(saved.read_text(encoding="utf-8"))) != _comparable(cfg.to_dict()):
        raise MoescopeError(f"{run_dir} holds a run of a different configuration; "
                            "use another --out, or delete that directory to retrain it")
    done = run_dir / "result.json"
    if done.exists() and (run_dir / "model" / "config.json").exists():
        return json.loads(done.read_text(encoding="utf-8")), False
    _quiet_transformers()
    train(cfg, run_dir, on_step=on_step)  # resumes from run_dir/checkpoint after an interruption
    return json.loads(done.read_text(encoding="utf-8")), True


def _quiet_transformers() -> None:
    """No 'Writing model shards' / 'Loading weights' bars in the middle of the experiment's own progress display."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def last_telemetry(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The routing telemetry of the run's last evaluation (training window before it), per layer."""
    path = run_dir / "metrics.jsonl"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []
    return json.loads(lines[-1]).get("routing", {}) if lines else {}


# -- measuring ----------------------------------------------------------------------------------
def route_validation(model_dir: Path, corpus_dir: str | Path, seq_len: int, m: Measurement) -> dict[str, Any]:
    """Route validation windows of every domain through a trained variant and collect its choices.

    Returns {"experts": (L, N, k) int array, "domain", "token_id", "sequence": (N,) arrays,
    "token_type": (N,) TOKEN_TYPES codes, "domains": names, "layers": MoE layer indices,
    "n_experts", "top_k"}; N = every input token of every window.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moescope.analysis.specialisation import token_type_codes
    from moescope.capture.recorder import record
    from moescope.train.batches import TokenCorpus
    from moescope.train.modeling import apply_routing_variant

    _quiet_transformers()
    model = apply_routing_variant(AutoModelForCausalLM.from_pretrained(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus = TokenCorpus(corpus_dir)
    # Token types of the whole vocabulary, from each id decoded alone.
    vocab_types = token_type_codes(tokenizer.decode([i]) for i in range(model.config.vocab_size))
    next_id = 0
    with record(model, tokenizer=tokenizer) as rec, torch.no_grad():
        for d, domain in enumerate(corpus.domains):
            windows = corpus.val_windows(domain, seq_len, m.tokens_per_domain)[:, :-1]
            for i in range(0, len(windows), m.batch_size):
                chunk = windows[i : i + m.batch_size]
                rec.expect(list(range(next_id, next_id + len(chunk))), metadata=[{"domain": domain}] * len(chunk))
                next_id += len(chunk)
                model(input_ids=chunk, use_cache=False)
        tables = rec.tables()
    return _arrays(tables, corpus.domains, vocab_types, model)


def _arrays(tables: dict[str, Any], domains: tuple[str, ...], vocab_types: np.ndarray, model: Any) -> dict[str, Any]:
    """Routes aligned across layers: rows sorted by (seq_id, pos), one block per layer."""
    seqs = tables["sequences"].to_pandas()[["seq_id", "domain"]]
    toks = tables["tokens"].to_pandas()[["seq_id", "pos", "token_id"]].sort_values(["seq_id", "pos"])
    routes = tables["routes"].to_pandas().sort_values(["layer", "seq_id", "pos"])
    layers = sorted(routes["layer"].unique().tolist())
    k = model.config.num_experts_per_tok
    experts = np.stack(routes["experts"].to_numpy()).astype(np.int64).reshape(len(layers), -1, k)
    if experts.shape[1] != len(toks):
        raise MoescopeError(f"routes cover {experts.shape[1]} tokens per layer but {len(toks)} tokens were fed")
    domain_of = dict(zip(seqs["seq_id"], seqs["domain"].map({d: i for i, d in enumerate(domains)})))
    token_id = toks["token_id"].to_numpy().astype(np.int64)
    return {"experts": experts, "sequence": toks["seq_id"].to_numpy().astype(np.int64),
            "domain": toks["seq_id"].map(domain_of).to_numpy().astype(np.int64), "token_id": token_id,
            "token_type": vocab_types[token_id], "domains": list(domains), "layers": [int(x) for x in layers],
            "n_experts": int(getattr(model.config, "num_experts", None) or model.config.num_local_experts),
            "top_k": k}


def measure_variant(model_dir: Path, corpus_dir: str | Path, seq_len: int, m: Measurement) -> dict[str, Any]:
    """Specialisation of one trained variant: NMI per layer and mean, with chance levels, and expert profiles.

    Returns {"measurement", "tokens" (routed per layer), "layers", "domains", "n_experts",
    "top_k", "specialisation" (see moescope.analysis.specialisation.specialisation),
    "specialises_by", "experts" ([per layer {"domain": [...], "token_type": [...]}: each
    expert's two most over-represented labels with their lift, 1 = chance])}.
    """
    from moescope.analysis.specialisation import TOKEN_TYPES, expert_profile, specialisation, specialises_by

    a = route_validation(model_dir, corpus_dir, seq_len, m)
    spec = specialisation(a["experts"], domain=a["domain"], token_type=a["token_type"], token_id=a["token_id"],
                          sequence=a["sequence"], n_experts=a["n_experts"], shuffles=m.shuffles, seed=m.seed)
    profiles = [{"domain": expert_profile(layer, a["domain"], a["domains"], a["n_experts"]),
                 "token_type": expert_profile(layer, a["token_type"], TOKEN_TYPES, a["n_experts"])}
                for layer in a["experts"]]
    type_share = np.bincount(a["token_type"], minlength=len(TOKEN_TYPES)) / max(len(a["token_type"]), 1)
    return {"measurement": dataclasses.asdict(m), "tokens": int(a["experts"].shape[1]), "layers": a["layers"],
            "domains": a["domains"], "n_experts": a["n_experts"], "top_k": a["top_k"],
            "token_type_shares": dict(zip(TOKEN_TYPES, np.round(type_share, 4).tolist())),
            "specialisation": spec, "specialises_by": specialises_by(spec), "experts": profiles}


def measured(run_dir: Path, corpus_dir: str | Path, seq_len: int, m: Measurement) -> dict[str, Any]:
    """measure_variant, cached in run_dir/specialisation.json for the same measurement settings."""
    cache = run_dir / "specialisation.json"
    if cache.exists():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("measurement") == dataclasses.asdict(m):
            return saved
    from moescope.analysis.result import to_jsonable

    result = to_jsonable(measure_variant(run_dir / "model", corpus_dir, seq_len, m))
    tmp = cache.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(cache)
    return result


# -- one row per variant ------------------------------------------------------------------------
def variant_row(variant: Variant, trained: dict[str, Any], spec: dict[str, Any],
                telemetry: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results.json row of a variant: perplexities (next to the unigram baseline), load
    balance (max_over_fair: busiest expert's share over the fair 1/E, 1 = balanced; dead
    experts), specialisation (NMI next to chance) and cost (tokens, training seconds)."""
    ev = trained["final_eval"]
    domains = {d: {"ppl": v["ppl"], "unigram_ppl": v["unigram_ppl"]} for d, v in ev["domains"].items()}
    # the same mean as mean_ppl (exp of the mean per-domain loss), for the unigram model
    unigram_mean = math.exp(sum(math.log(v["unigram_ppl"]) for v in domains.values()) / len(domains))
    layers = sorted(telemetry, key=int)
    s = spec["specialisation"]
    return {
        "name": variant.name, "routing": variant.routing, "top_k": variant.top_k, "router": variant.router,
        "seed": variant.seed, "steps": trained["steps"], "tokens": trained["tokens"],
        "seconds": trained["seconds"], "parameters": trained["parameters"],
        "mean_ppl": ev["mean_ppl"], "unigram_mean_ppl": round(unigram_mean, 3), "domains": domains,
        "load": {"layers": [int(x) for x in layers],
                 "max_over_fair": [telemetry[x]["max_over_fair"] for x in layers],
                 "dead": [len(telemetry[x]["dead"]) for x in layers]},
        "measured_tokens": spec["tokens"], "moe_layers": spec["layers"], "n_experts": spec["n_experts"],
        "domain_nmi": s["domain"], "token_type_nmi": s["token_type"],
        "token_type_nmi_within_sequence": s["token_type_within_sequence"], "token_id_nmi": s["token_id"],
        "domain_nmi_vocabulary_control": s["domain_vocabulary_control"],
        "specialises_by": spec["specialises_by"], "experts": spec["experts"],
        "token_type_shares": spec["token_type_shares"],
    }


def check_inputs(base: TrainConfig, variants: list[Variant]) -> list[TrainConfig]:
    """Every variant's config; raises MoescopeError for a missing corpus or an impossible
    top-k before anything is trained or any directory is made."""
    from moescope.train.batches import TokenCorpus

    TokenCorpus(base.data.corpus, base.data.domains)
    return [variant_config(base, v) for v in variants]


def run_experiment(out: str | Path, variants: list[Variant], base: TrainConfig, m: Measurement, *,
                   on_variant: Callable[[Variant, str], None] | None = None,
                   on_step: Callable[[int, int, dict], None] | None = None) -> list[dict[str, Any]]:
    """Train (or reuse) and measure every variant into OUT/variants/<name>; returns their rows.

    `on_variant(variant, stage)` is told "train", "measure" and "done" (progress display);
    `on_step` is passed to train().
    """
    configs = check_inputs(base, variants)
    rows = []
    for variant, cfg in zip(variants, configs):
        run_dir = Path(out) / "variants" / variant.name
        if on_variant:
            on_variant(variant, "train")
        trained, _ = train_variant(cfg, run_dir, on_step)
        if on_variant:
            on_variant(variant, "measure")
        spec = measured(run_dir, cfg.data.corpus, cfg.data.seq_len, m)
        rows.append(variant_row(variant, trained, spec, last_telemetry(run_dir)))
        if on_variant:
            on_variant(variant, "done")
    return rows
