"""The recorder: what it records is what the model used, and it changes nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moescope.capture.recorder import CaptureOptions, Recorder, record
from moescope.errors import MoescopeError

from conftest import build_tiny_olmoe


@pytest.fixture(scope="module")
def model():
    return build_tiny_olmoe(200, layers=3, experts=8, top_k=2, seed=1)


def _batch(seed=0, batch=3, width=9, pad=(3, 0, 5)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 200, (batch, width), generator=g)
    mask = torch.ones(batch, width, dtype=torch.long)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
        ids[row, :n] = 1  # pad id
    return ids, mask


def _experts_inputs(model):
    """Independent hooks on every experts module: (ids, weights) handed to the experts computation."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            layer = int(name.split(".")[2])
            handles.append(module.register_forward_pre_hook(
                lambda m, a, layer=layer: seen.__setitem__(layer, (a[1].detach().clone(), a[2].detach().clone()))))
    return seen, handles


def test_forward_records_exactly_what_the_experts_received(model):
    ids, mask = _batch()
    seen, handles = _experts_inputs(model)
    with record(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    routes = rec.tables()["routes"].to_pandas()
    real = mask.bool()
    assert len(routes) == int(real.sum()) * 3  # padding never recorded; 3 MoE layers
    for layer, (idx, w) in seen.items():
        idx = idx.view(3, 9, -1)
        w = w.view(3, 9, -1)
        for row in range(3):
            cols = real[row].nonzero().flatten()
            got = routes[(routes.seq_id == row) & (routes.layer == layer)].sort_values("pos")
            assert list(got.pos) == list(range(len(cols)))  # pos counts real tokens from 0
            for p, col in enumerate(cols):
                want_w = w[row, col].to(torch.float16).numpy()
                want_ids = idx[row, col].numpy()
                order = np.argsort(-want_w.astype(np.float32), kind="stable")
                assert list(got.experts.iloc[p]) == list(want_ids[order])
                assert np.array_equal(np.asarray(got.weights.iloc[p], np.float16), want_w[order])


def test_capture_changes_nothing_bit_for_bit(model):
    ids, mask = _batch(seed=3)
    with torch.no_grad():
        off = model(input_ids=ids, attention_mask=mask).logits
        with record(model, router_scores="probs", hidden_rate=1.0):
            on = model(input_ids=ids, attention_mask=mask).logits
        gen_off = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
        with record(model):
            gen_on = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(off, on)
    assert torch.equal(gen_off, gen_on)
    assert not hasattr(model, "generate") or "generate" not in model.__dict__  # wrapper removed on exit


def _zero_expert(block, expert):
    with torch.no_grad():
        for p in block.experts.parameters():
            if p.dim() >= 2 and p.shape[0] == block.experts.num_experts:
                p[expert].zero_()


def test_counterfactual_zeroing_an_expert_changes_exactly_its_tokens(model):
    """Zero expert e's weights: the MoE block's output changes exactly where e was recorded."""
    ids, mask = _batch(seed=5)
    block = model.model.layers[1].mlp
    outputs = []
    hook = block.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    with record(model) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    routes = rec.tables()["routes"].to_pandas()
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    for expert in range(8):
        _zero_expert(block, expert)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        block.load_state_dict(saved)
        base, changed = outputs[0].view(3, 9, -1), outputs[-1].view(3, 9, -1)
        diff = (base != changed).any(dim=-1)  # (B, T)
        layer1 = routes[routes.layer == 1]
        for row in range(3):
            cols = mask[row].bool().nonzero().flatten()
            recorded = [expert in list(e) for e in layer1[layer1.seq_id == row].sort_values("pos").experts]
            assert diff[row, cols].tolist() == recorded, f"expert {expert}, row {row}"
    hook.remove()


def test_generate_phases_positions_and_padding(model):
    ids, mask = _batch(seed=7)
    with record(model) as rec, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=1, eos_token_id=None)
    t = rec.tables()
    tokens, routes = t["tokens"].to_pandas(), t["routes"].to_pandas()
    for row in range(3):
        n_prompt = int(mask[row].sum())
        tok = tokens[tokens.seq_id == row].sort_values("pos")
        assert list(tok.pos) == list(range(n_prompt + 5))
        assert list(tok.phase) == ["prompt"] * n_prompt + ["generated"] * 5
        assert list(tok.token_id[n_prompt:]) == out[row, 9:].tolist()
        assert list(tok.token_id[:n_prompt]) == ids[row, mask[row].bool()].tolist()
        # every token but the last generated one was fed to the model, at every MoE layer
        r = routes[routes.seq_id == row]
        assert sorted(set(r.pos)) == list(range(n_prompt + 4))
        assert len(r) == (n_prompt + 4) * 3


def test_generate_trims_after_eos(model):
    ids, mask = _batch(seed=7)
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
    eos = int(free[0, 9 + 1])  # make row 0's second generated token the EOS
    with record(model) as rec, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=1, eos_token_id=eos)
    t = rec.tables()
    tokens, routes = t["tokens"].to_pandas(), t["routes"].to_pandas()
    gen = out[0, 9:].tolist()
    n_gen = gen.index(eos) + 1
    n_prompt = int(mask[0].sum())
    assert (tokens[tokens.seq_id == 0].phase == "generated").sum() == n_gen
    assert routes[routes.seq_id == 0].pos.max() <= n_prompt + n_gen - 1


def test_uncached_generate_records_each_position_once(model):
    ids, mask = _batch(seed=9)
    with record(model) as cached, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    with record(model) as uncached, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1,
                       use_cache=False)
    a, b = cached.tables()["routes"].to_pandas(), uncached.tables()["routes"].to_pandas()
    assert list(zip(a.seq_id, a.pos, a.layer)) == list(zip(b.seq_id, b.pos, b.layer))
    agree = np.mean([set(x) == set(y) for x, y in zip(a.experts, b.experts)])
    assert agree > 0.95  # same routing up to float reassociation between the two code paths


def test_sampling_is_recorded_and_reproducible(model):
    ids, mask = _batch(seed=11)
    tables = []
    for _ in range(2):
        torch.manual_seed(123)
        with record(model) as rec, torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0,
                           pad_token_id=1)
        tables.append(rec.tables())
    assert tables[0]["routes"].equals(tables[1]["routes"])
    assert tables[0]["tokens"].equals(tables[1]["tokens"])


def test_beam_search_is_refused(model):
    ids, mask = _batch()
    with record(model), pytest.raises(MoescopeError, match="beam search"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, pad_token_id=1)


def test_router_probs_and_logits(model):
    ids, mask = _batch(seed=13)
    with record(model, router_scores="probs") as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    routes = rec.tables()["routes"].to_pandas()
    probs = np.stack(routes.router_probs.to_numpy()).astype(np.float32)
    assert probs.shape[1] == 8
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=5e-3)
    top2 = np.argsort(-probs, axis=1)[:, :2]
    agree = np.mean([set(t) == set(e) for t, e in zip(top2, routes.experts)])
    assert agree > 0.99  # fp16 ties aside, the recorded experts are the router's top-k
    with record(model, router_scores="logits") as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    logits = np.stack(rec.tables()["routes"].to_pandas().router_logits.to_numpy()).astype(np.float32)
    np.testing.assert_allclose(torch.softmax(torch.tensor(logits), -1).numpy(), probs, atol=2e-3)


def test_hidden_states_are_the_router_input(model):
    ids, mask = _batch(seed=17)
    inputs = {}
    hooks = [model.model.layers[i].mlp.gate.register_forward_pre_hook(
        lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().clone())) for i in range(3)]
    with record(model, hidden_rate=0.5, seed=4) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    hidden = rec.tables()["hidden"].to_pandas()
    n_real = int(mask.sum())
    per_layer = hidden.groupby("layer").size()
    assert set(per_layer.index) == {0, 1, 2}
    assert 0.2 * n_real < per_layer.iloc[0] < 0.8 * n_real  # about half the tokens sampled
    assert (per_layer == per_layer.iloc[0]).all()  # the same tokens at every layer
    for _, row in hidden.iterrows():
        b = int(row.seq_id)
        col = int(mask[b].bool().nonzero().flatten()[int(row.pos)])
        want = inputs[int(row.layer)].view(3, 9, -1)[b, col].to(torch.float16).numpy()
        assert np.array_equal(np.asarray(row.hidden, np.float16), want)


def test_hidden_positions_option(model):
    ids, mask = _batch(seed=19)
    with record(model, hidden_positions=(0, 2)) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hidden = rec.tables()["hidden"].to_pandas()
    assert set(hidden.pos) == {0, 2}
    assert len(hidden) == 3 * 2 * 3


def test_dense_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(MoescopeError, match="no MoE layers"):
        Recorder(dense)


def test_bad_options_are_refused():
    with pytest.raises(MoescopeError):
        CaptureOptions(router_scores="weights")
    with pytest.raises(MoescopeError):
        CaptureOptions(hidden_rate=2.0)
