"""Every architecture family: the recorded routing is what the model used in that forward pass.

For each MoE model type of the pinned transformers, on a tiny random model built from its
config (moescope.testing.tiny), one model build shared by every test of the type:
- capture changes nothing: outputs with and without it are equal, bit for bit;
- every real token of every MoE layer has exactly one record; padding has none;
- the weight read-back proof (moescope.verify) passes at every MoE layer: with every expert
  made to output a known vector, the block's output shows which experts reached each token
  with what weight, and that equals the record (ids and weights, post-hoc scales included).
  It does not re-implement routing, so it cannot share a bug with an adapter; the committed
  record moescope/adapters/verified.json (what `moescope models` shows) must agree with it;
- end to end: the trace the recorder assembled (padding dropped, slots sorted by weight) holds,
  token by token, the experts and weights read back from the block outputs;
- generate(): prompt and generated phases, positions continuing after the prompt.
tests/test_verify.py holds the proof's own known-answer tests (mutated adapters must fail).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moescope.adapters.catalog import catalog, load_verified
from moescope.adapters.registry import family_for_model, model_types
from moescope.capture.recorder import record
from moescope.testing.proof import (BATCH, PARTIAL_REACH, prove_tiny, record_entry, seeded_forward_rng,
                                    tiny_inputs, unreached)
from moescope.testing.tiny import NOT_BUILDABLE, TINY_MODEL_TYPES, tiny_model

# transformers 5.23's NllbMoeExperts runs only expert_0 and expert_1 whatever the router decides:
# the proof must see that (the record says the router's choice, the experts computed another).
KNOWN_BROKEN_IN_TRANSFORMERS = {"nllb_moe"}


def _inputs(model):
    return tiny_inputs(model)


def _forward(model, kwargs):
    seeded_forward_rng(model)
    with torch.no_grad():
        out = model(**kwargs)
    return out


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return _first_tensor(out.to_tuple())


@pytest.fixture(scope="module", params=TINY_MODEL_TYPES)
def captured(request):
    """One tiny model per type, a forward without and with capture, and the read-back proof."""
    torch.set_num_threads(1)
    model = tiny_model(request.param, seed=0)
    kwargs = _inputs(model)
    base = _first_tensor(_forward(model, kwargs)).clone()
    with record(model) as rec:
        on = _first_tensor(_forward(model, kwargs)).clone()
    tables = rec.tables()
    proof = prove_tiny(model)
    after = _first_tensor(_forward(model, kwargs)).clone()
    return SimpleNamespace(model_type=request.param, model=model, kwargs=kwargs, base=base, on=on, after=after,
                           tables=tables, layers=rec.layers, proof=proof)


def test_capture_changes_nothing(captured):
    assert torch.equal(captured.base, captured.on)


def test_read_back_proof(captured):
    """Recorded ids and weights are what reached the block's output, at every MoE layer; the
    committed record agrees; and the proof left the model as it found it."""
    proof, model_type = captured.proof, captured.model_type
    assert [layer.layer for layer in proof.layers] == [layer.layer for layer in captured.layers]
    if model_type in KNOWN_BROKEN_IN_TRANSFORMERS:
        assert not proof.passed, "the proof no longer sees the transformers bug: re-check and update"
        assert all(layer.experts_match < 1 for layer in proof.layers)
    else:
        assert proof.passed, [(layer.layer, layer.reason) for layer in proof.layers if not layer.passed]
        assert all(layer.rows > 0 and layer.experts_reached >= 2 for layer in proof.layers)
    recorded = load_verified()["model_types"].get(model_type)
    assert recorded == record_entry(proof), "moescope/adapters/verified.json is stale: run scripts/verify_all_models.py"
    assert torch.equal(captured.after, captured.base)  # restored: same output as before the proof
    assert not any("forward" in m.__dict__ for m in captured.model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in captured.model.modules())


def test_proof_reaches_every_expert(captured):
    """The proof checks only experts some token reached (an adapter swapping two unreached experts
    would pass), so the inputs (moescope.testing.proof.WIDER) must reach every expert of every MoE
    layer; the few types where the tiny model cannot are listed with the reason, exactly."""
    missing = unreached(captured.proof)
    expected = PARTIAL_REACH.get(captured.model_type, ([], ""))[0]
    assert missing == expected, f"unreached (layer, reached, of): {missing}; widen WIDER or update PARTIAL_REACH"
    assert all(layer.n_experts > 0 for layer in captured.proof.layers)


def _block_row(kwargs, layer, model, seq, pos):
    """Row of the MoE block's (batch x width) input that holds trace token (seq, pos)."""
    mask = kwargs["attention_mask"]
    if getattr(model.config, "is_encoder_decoder", False) and "encoder" not in layer.stack.split("."):
        width = kwargs["decoder_input_ids"].shape[1]
        return seq * width + pos - int(mask[seq].sum())  # decoder positions follow the encoder's
    return seq * mask.shape[1] + int(mask[seq].bool().nonzero().flatten()[pos])


def test_trace_equals_what_reached_the_block_output(captured):
    """End to end: the trace's experts and weights (after the recorder's assembly: padding dropped,
    slots sorted by weight) equal the weights read back from each block's output, token by token."""
    if captured.model_type in KNOWN_BROKEN_IN_TRANSFORMERS:
        pytest.skip("the experts do not compute what the router decided (transformers bug)")
    routes = captured.tables["routes"].to_pandas()
    for proof, layer in zip(captured.proof.layers, captured.layers):
        rows = routes[routes.layer == layer.layer]
        expected = np.zeros((len(rows), layer.n_experts + 1))
        index = []
        for i, r in enumerate(rows.itertuples()):
            dropped = r.dropped if getattr(r, "dropped", None) is not None else [False] * len(r.experts)
            for e, w, d in zip(r.experts, r.weights, dropped):
                if not d:
                    expected[i, min(int(e), layer.n_experts)] += float(w)
            index.append(_block_row(captured.kwargs, layer, captured.model, r.seq_id, r.pos))
        read_back = proof.decoded[index]
        seen = ~np.isnan(read_back).any(axis=1)
        assert seen.sum() >= len(rows) - 3  # only Llama 4's all-zero inputs are unobservable
        # The trace stores weights as float16 by default: half a unit in the last place more.
        stored = proof.tolerance + 2.0 ** -11 * np.abs(expected[seen])
        assert (np.abs(read_back[seen] - expected[seen]) <= stored).all(), f"layer {layer.layer}"


def _real_positions(kwargs, stack_is_decoder_of_encdec):
    if stack_is_decoder_of_encdec:
        return kwargs["decoder_input_ids"].shape[1] * BATCH
    return int(kwargs["attention_mask"].sum())


def test_one_record_per_real_token_and_layer(captured):
    model, kwargs, tables, layers = captured.model, captured.kwargs, captured.tables, captured.layers
    routes = tables["routes"].to_pandas()
    encdec = getattr(model.config, "is_encoder_decoder", False)
    assert len(layers) >= 2
    for layer in layers:
        rows = routes[routes.layer == layer.layer]
        decoder = encdec and "encoder" not in layer.stack.split(".")
        expected = _real_positions(kwargs, decoder)
        assert len(rows) == expected, f"layer {layer.layer}"
        assert rows.experts.map(len).eq(layer.top_k).all()
        ids = np.concatenate(rows.experts.to_numpy())
        limit = layer.n_experts * (2 if family_for_model(model).zero_experts else 1)
        assert ids.max() < limit
        weights = np.concatenate(rows.weights.to_numpy()).astype(np.float32)
        assert np.isfinite(weights).all()
        # ordered by weight, descending
        w = np.stack(rows.weights.to_numpy()).astype(np.float32)
        assert (np.diff(w, axis=1) <= 0).all()
    assert routes.groupby(["seq_id", "pos", "layer"]).size().max() == 1


NO_GENERATE = {"diffusion_gemma", "openai_privacy_filter"}


def test_generate_marks_phases(captured):
    model, model_type = captured.model, captured.model_type
    if model_type in NO_GENERATE or not model.can_generate():
        pytest.skip(f"{type(model).__name__} does not generate text")
    kwargs = {k: v for k, v in _inputs(model).items() if k != "decoder_input_ids"}
    pad = model.config.get_text_config().pad_token_id
    with record(model) as rec, torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=3, do_sample=False, eos_token_id=None,
                             pad_token_id=pad if pad is not None else 0)
    tables = rec.tables()
    tokens, routes = tables["tokens"].to_pandas(), tables["routes"].to_pandas()
    encdec = getattr(model.config, "is_encoder_decoder", False)
    for seq in range(BATCH):
        n_prompt = int(kwargs["attention_mask"][seq].sum())
        tok = tokens[tokens.seq_id == seq].sort_values("pos")
        n_gen = out.shape[1] if encdec else out.shape[1] - kwargs["input_ids"].shape[1]
        assert list(tok.phase) == ["prompt"] * n_prompt + ["generated"] * n_gen
        assert list(tok.pos) == list(range(n_prompt + n_gen))
        assert routes[routes.seq_id == seq].pos.max() == n_prompt + n_gen - 2


def test_every_moe_model_type_is_supported_or_explained():
    import transformers

    assert set(model_types()) == set(TINY_MODEL_TYPES)
    record = load_verified()
    assert set(record["model_types"]) == set(TINY_MODEL_TYPES), "verified.json is stale: run scripts/verify_all_models.py"
    assert record["transformers"] == transformers.__version__, "verified.json was made with another transformers"
    rows = {r.model_type: r for r in catalog()}
    assert {t for t, r in rows.items() if not r.verified} == KNOWN_BROKEN_IN_TRANSFORMERS
    assert "expert_0 and expert_1" in rows["nllb_moe"].verified_note
    assert all(isinstance(r.n_experts, int) or r.n_experts == "ckpt" for r in rows.values())
    assert rows["dbrx"].n_experts == 4 and rows["inkling"].top_k == 6 and rows["qwen3_omni_moe"].n_experts == 128
    assert set(NOT_BUILDABLE) == {"gemma4_assistant", "gemma4_unified", "qwen3_5", "vitpose_backbone"}


# One family per router kind (and per probe): softmax and sigmoid contract experts, sqrt-softplus
# with hash layers, grouped selection, identity experts, a post-hoc scale, input-scaled weights
# (Llama 4), sorted slots (JetMoE), product keys (Doge), capacity drops (Switch).
BF16_KINDS = ["mixtral", "deepseek_v3", "deepseek_v4", "longcat_flash", "cohere2_moe", "llama4", "jetmoe", "doge",
              "switch_transformers", "inkling2"]


def _bf16_checks(model_type):
    torch.set_num_threads(1)
    model = tiny_model(model_type, seed=0, dtype=torch.bfloat16)
    kwargs = _inputs(model)
    base = _first_tensor(_forward(model, kwargs)).clone()
    with record(model) as rec:
        on = _first_tensor(_forward(model, kwargs)).clone()
    assert torch.equal(base, on)
    routes = rec.tables()["routes"].to_pandas()
    encdec = getattr(model.config, "is_encoder_decoder", False)
    for layer in rec.layers:
        decoder = encdec and "encoder" not in layer.stack.split(".")
        assert (routes.layer == layer.layer).sum() == _real_positions(kwargs, decoder)
    weights = np.concatenate(routes.weights.to_numpy()).astype(np.float32)
    assert np.isfinite(weights).all()
    proof = prove_tiny(model)
    assert proof.dtype == "bfloat16"
    if model_type in KNOWN_BROKEN_IN_TRANSFORMERS:
        assert not proof.passed
    else:
        assert proof.passed, [(layer.layer, layer.reason) for layer in proof.layers if not layer.passed]


@pytest.mark.parametrize("model_type", BF16_KINDS)
def test_bfloat16_read_back_per_router_kind(model_type):
    """bf16 checkpoints (the usual GPU case): capture changes nothing, keeps every real token, and
    the read-back proof passes (tolerance 2e-2 of the largest weight)."""
    _bf16_checks(model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in TINY_MODEL_TYPES if t not in BF16_KINDS])
def test_bfloat16_models(model_type):
    """The same for every other model type."""
    _bf16_checks(model_type)


def test_models_table_fits_80_columns_and_shows_every_e_and_k(monkeypatch, capsys):
    from moescope.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr("sys.argv", ["moescope", "models"])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0] in TINY_MODEL_TYPES]
    assert len(rows) == len(TINY_MODEL_TYPES)  # one line per model type: nothing wrapped
    assert all(cells[-1] in ("yes", "no") for cells in rows)
    assert all(cells[-4] == "ckpt" or cells[-4].isdigit() for cells in rows)  # E
    assert all(cells[-3] == "ckpt" or cells[-3].isdigit() for cells in rows)  # k
    assert {cells[0] for cells in rows if cells[-1] == "no"} == KNOWN_BROKEN_IN_TRANSFORMERS
