"""Known-answer tests of the weight read-back proof (moescope.verify) and `moescope verify`.

- planted: every correct adapter passes (tests/test_adapters.py, every model type);
- broken adapters must fail: a removed post-hoc scale, two experts swapped, weights permuted
  among a token's experts, capacity drops recorded as kept, identity experts recorded as routed
  ones, un-renormalised weights;
- trap: a removed scale leaves every expert id right, so a check of ids alone would pass; the
  proof must fail on the weights;
- the transformers bug in NLLB-MoE (experts 0 and 1 run whatever the router says) is seen;
- the built-in default model: loads, captures a few texts, and verifies from the command line.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch

from moescope.adapters.registry import family_for_model
from moescope.testing.proof import prove_tiny
from moescope.testing.tiny import tiny_model

from conftest import build_tokenizer
from test_cli_errors import run_cli_captured


@functools.lru_cache(maxsize=None)
def _model(model_type: str):
    torch.set_num_threads(1)
    return tiny_model(model_type, seed=0)


class _Mutated:
    """A family whose recorded routing passes through `change(ids, weights, dropped)` first."""

    def __init__(self, family, change):
        self._family, self._change = family, change

    def __getattr__(self, name):
        return getattr(self._family, name)

    def attach(self, model, layer, sink, *, logits, hidden):
        change = self._change

        class ChangedSink:
            def routes(self, layer, ids, weights, dropped=None):
                sink.routes(layer, *change(ids, weights, dropped))

            def router_input(self, layer, hidden):
                pass

            def router_logits(self, layer, logits):
                pass

        return self._family.attach(model, layer, ChangedSink(), logits=logits, hidden=hidden)


def _swap(a: int, b: int):
    def change(ids, weights, dropped):
        swapped = ids.clone()
        swapped[ids == a], swapped[ids == b] = b, a
        return swapped, weights, dropped
    return change


def _roll_weights(ids, weights, dropped):
    return ids, weights.roll(1, dims=-1), dropped


def _keep_dropped(ids, weights, dropped):
    return ids, weights, torch.zeros_like(dropped)


def _identity_as_routed(ids, weights, dropped):
    return ids % 8, weights, dropped  # the tiny models have E = 8 routed experts


def _unnormalised(ids, weights, dropped):
    return ids, weights * 1.1, dropped


MUTATIONS = {
    "llama4 swaps experts 6 and 7": ("llama4", _swap(6, 7)),
    "mixtral swaps experts 0 and 1": ("mixtral", _swap(0, 1)),
    "jetmoe permutes weights among a token's experts": ("jetmoe", _roll_weights),
    "deepseek_v3 permutes weights among a token's experts": ("deepseek_v3", _roll_weights),
    "switch records capacity drops as kept": ("switch_transformers", _keep_dropped),
    "longcat records identity experts as routed ones": ("longcat_flash", _identity_as_routed),
    "olmoe records weights 10% off": ("olmoe", _unnormalised),
    "doge swaps experts 0 and 1": ("doge", _swap(0, 1)),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_broken_adapter_fails(name):
    model_type, change = MUTATIONS[name]
    model = _model(model_type)
    assert prove_tiny(model).passed  # the real adapter passes ...
    proof = prove_tiny(model, family=_Mutated(family_for_model(model), change))
    assert not proof.passed  # ... the broken one does not
    assert any(layer.max_weight_error > layer.tolerance for layer in proof.layers)


@pytest.mark.parametrize("model_type", ["cohere2_moe", "minimax_m3_vl", "step3p7", "openai_privacy_filter"])
def test_removed_post_hoc_scale_fails_though_every_id_is_right(model_type):
    """The trap: without the block's scale (Cohere2-MoE's averaging with the shared output, a
    routed_scaling_factor applied after the experts) every expert id is still right."""
    model = _model(model_type)
    family = family_for_model(model)
    assert family.weight_scale is not None
    proof = prove_tiny(model, family=dataclasses.replace(family, weight_scale=None))
    assert not proof.passed
    assert all(layer.experts_match == 1.0 for layer in proof.layers)  # ids alone would pass
    assert all(layer.max_weight_error > layer.tolerance for layer in proof.layers)


def test_nllb_moe_transformers_bug_is_seen():
    proof = prove_tiny(_model("nllb_moe"))
    assert not proof.passed
    assert all("assignments differ" in layer.reason for layer in proof.layers)


def test_proof_of_selected_layers_and_json_shape():
    model = _model("qwen3_moe")
    proof = prove_tiny(model, layers=[2])
    assert [layer.layer for layer in proof.layers] == [2]
    payload = json.loads(json.dumps(proof.to_dict()))
    assert payload["passed"] is True
    assert {"layer", "passed", "experts_match", "max_weight_error"} <= set(payload["layers"][0])


def test_default_model_loads_captures_and_verifies(tmp_path, capsys):
    """The built-in default model, through the same paths a user takes."""
    from moescope.capture.loading import load_model
    from moescope.capture.recorder import record

    model, tokenizer = load_model(None)
    batch = tokenizer(["The cat sat on the mat.", "def add(a, b): return a + b"], return_tensors="pt", padding=True)
    with record(model, tokenizer=tokenizer) as rec, torch.no_grad():
        model(**batch)
    routes = rec.tables()["routes"]
    assert routes.num_rows == int(batch["attention_mask"].sum()) * len(rec.layers)

    out = tmp_path / "proof.json"
    code, printed = run_cli_captured(["verify", "--tokens", "48", "--out", str(out)], capsys)
    assert code in (0, None), printed.err
    result = json.loads(out.read_text())
    assert result["passed"] is True and result["model_type"] == "olmoe" and result["tokens"] == 48
    assert len(result["layers"]) == len(rec.layers)
    assert all(layer["experts_match"] == 1.0 and layer["max_weight_error"] < 1e-4 for layer in result["layers"])
    assert "verified" in printed.out
    unreached = sum(layer["n_experts"] - layer["experts_reached"] for layer in result["layers"])
    # 48 tokens do not reach all 16 experts of every layer: the verdict must say which part is unchecked
    assert unreached == 0 or "unchecked" in printed.out


def test_verify_exits_non_zero_when_a_layer_fails(tmp_path, capsys):
    """A checkpoint whose record is not what its experts computed (NLLB-MoE in transformers 5.23)."""
    path = tmp_path / "nllb"
    tokenizer = build_tokenizer(path)
    model = tiny_model("nllb_moe", seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       decoder_start_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    out = tmp_path / "proof.json"
    code, printed = run_cli_captured(["verify", "--model", str(path), "--tokens", "32", "--out", str(out)], capsys)
    assert code == 1
    result = json.loads(out.read_text())
    assert result["passed"] is False and not any(layer["passed"] for layer in result["layers"])
    assert "not verified" in printed.out


def test_more_experts_than_dimensions_are_read_back_in_groups():
    """Doge's product keys: 256 one-neuron experts for a 64-wide output. One pass cannot tell 256
    vectors apart in 64 dimensions; groups of 32 experts (the rest silent) can."""
    model = tiny_model("doge", seed=0, num_experts=256)
    proof = prove_tiny(model)
    assert proof.passed, [layer.reason for layer in proof.layers]
    assert all(layer.experts_reached > 32 for layer in proof.layers)  # more than one group was exercised
    broken = prove_tiny(model, family=_Mutated(family_for_model(model), _swap(*_two_used_experts(model))))
    assert not broken.passed


def _two_used_experts(model):
    proof = prove_tiny(model)
    used = np.flatnonzero(np.nan_to_num(np.abs(proof.layers[0].decoded[:, :-1])).max(axis=0) > 0.01)
    return int(used[0]), int(used[-1])


def test_verify_refuses_a_dense_model_in_one_line(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer(tmp_path / "dense")
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    code, printed = run_cli_captured(["verify", "--model", str(tmp_path / "dense")], capsys)
    assert code not in (0, None)
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no MoE layers" in errors[0] and "Traceback" not in printed.err


def test_no_layer_to_prove_is_an_error_not_a_pass():
    from moescope.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="nothing to verify"):
        prove_tiny(_model("qwen3_moe"), layers=[99])
