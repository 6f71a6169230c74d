"""The trainer on a micro config: it learns, its variants do what they say, it resumes exactly."""
from __future__ import annotations

import json

import pytest
import torch

from moescope.train.config import TrainConfig, config_from_dict, load_config
from moescope.train.modeling import apply_routing_variant, routers
from moescope.train.trainer import train
from moescope.errors import MoescopeError

MICRO = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "n_experts": 4, "top_k": 2,
              "expert_size": 32},
    "data": {"seq_len": 32, "eval_tokens_per_domain": 256},
    "optim": {"lr": 0.01, "batch_size": 8, "max_tokens": 8 * 32 * 30, "warmup_steps": 3},
    "eval_every": 10,
    "checkpoint_every": 10,
    "threads": 1,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from moescope.errors import DataError
    from moescope.train.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus")
    try:
        build_corpus(out, chars_per_domain=20_000, vocab_size=512)
    except DataError as exc:  # a Debian source package missing: scripts/install.sh brings them
        pytest.skip(str(exc))
    return out


def micro(corpus, **sections) -> TrainConfig:
    cfg = config_from_dict(json.loads(json.dumps(MICRO)))
    cfg = cfg.replace(data={"corpus": str(corpus)})
    return cfg.replace(**sections) if sections else cfg


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_telemetry_is_per_layer(corpus, tmp_path):
    result = train(micro(corpus), tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert rows[-1]["val"]["mean_ppl"] < rows[0]["val"]["mean_ppl"]
    domains = rows[-1]["val"]["domains"]
    assert set(domains) >= {"code", "narrative", "math"}
    assert all(d["ppl"] < d["unigram_ppl"] * 2 for d in domains.values())  # on the way to beating unigram
    routing = rows[-1]["routing"]
    assert set(routing) == {"0", "1"}
    for layer in routing.values():
        assert abs(sum(layer["load"]) - 1) < 1e-4
        assert 0 <= layer["load_entropy"] <= 1 and layer["max_over_fair"] >= 1
        assert "aux_loss" in layer and "z_loss" in layer
    assert result.tokens == 8 * 32 * 30


def test_frozen_router_stays_bit_identical(corpus, tmp_path):
    from moescope.train.modeling import build_model

    cfg = micro(corpus, model={"router": "frozen"}, optim={"max_tokens": 8 * 32 * 5})
    start = build_model(cfg.model, vocab_size=512, bos_id=0, eos_id=0, pad_id=1, seed=cfg.seed)
    before = [r.weight.detach().clone() for r in routers(start)]
    result = train(cfg, tmp_path / "run")
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(result.model_dir)
    after = [r.weight.detach() for r in routers(trained)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # ...while the rest of the model did train
    assert not torch.equal(start.model.embed_tokens.weight, trained.model.embed_tokens.weight)


def test_sequence_level_routing_gives_one_expert_set_per_sequence(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moescope.capture.recorder import record

    cfg = micro(corpus, model={"routing": "sequence"}, optim={"max_tokens": 8 * 32 * 5})
    result = train(cfg, tmp_path / "run")
    model = apply_routing_variant(AutoModelForCausalLM.from_pretrained(result.model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    batch = tok(["def f(x): return x + 1", "In the beginning God created the heaven and the earth."],
                return_tensors="pt", padding=True)
    with record(model, tokenizer=tok) as rec, torch.no_grad():
        model(input_ids=batch["input_ids"])
    routes = rec.tables()["routes"].to_pandas()
    sets = routes.assign(s=routes.experts.map(lambda e: tuple(sorted(e)))).groupby(["seq_id", "layer"]).s.nunique()
    assert (sets == 1).all()
    per_seq = routes.assign(s=routes.experts.map(lambda e: tuple(sorted(e)))).groupby(["layer", "seq_id"]).s.first()
    assert per_seq.unstack().nunique(axis=1).max() >= 1


def test_checkpoint_round_trips_through_from_pretrained(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moescope.capture.loading import load_model
    from moescope.train.trainer import evaluate
    from moescope.train.batches import TokenCorpus

    cfg = micro(corpus, optim={"max_tokens": 8 * 32 * 5})
    result = train(cfg, tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    again = evaluate(model, TokenCorpus(cfg.data.corpus), cfg)
    assert again["mean_loss"] == pytest.approx(result.final_eval["mean_loss"], abs=1e-5)
    assert AutoTokenizer.from_pretrained(result.model_dir).eos_token == "<|endoftext|>"
    loaded, _ = load_model(str(result.model_dir))  # the same path as any user's model
    assert loaded.config.model_type == "olmoe"


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_the_same_model(corpus, tmp_path):
    from safetensors.torch import load_file

    cfg = micro(corpus)
    train(cfg, tmp_path / "straight")

    def stop_at_15(step, total, stats):
        if step == 15:
            raise Interrupted  # as if killed between checkpoints (the last one was at step 10)

    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "interrupted", on_step=stop_at_15)
    resumed = train(cfg, tmp_path / "interrupted")
    assert resumed.steps == 30
    a = load_file(tmp_path / "straight/model/model.safetensors")
    b = load_file(tmp_path / "interrupted/model/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in _metrics(tmp_path / "interrupted")]
    assert steps == sorted(set(steps)) == [10, 20, 30]  # no duplicate metric lines after the resume


def test_config_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_expert: 8\n")
    with pytest.raises(MoescopeError, match="did you mean 'n_experts'"):
        load_config(bad)
    bad.write_text("model:\n  routing: per-token\n")
    with pytest.raises(MoescopeError, match="model.routing"):
        load_config(bad)
    with pytest.raises(MoescopeError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_hf_trainer_callback_logs_per_layer_telemetry(tmp_path):
    from transformers import OlmoeConfig, OlmoeForCausalLM, Trainer, TrainingArguments

    from moescope.train.telemetry import RoutingTelemetryCallback

    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2, pad_token_id=1, eos_token_id=0, bos_token_id=0))
    data = [{"input_ids": torch.randint(2, 64, (16,)), "labels": torch.randint(2, 64, (16,))} for _ in range(16)]
    log = tmp_path / "routing.jsonl"
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=4,
                             logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback = RoutingTelemetryCallback.install(trainer, log)
    seen_by_later_callbacks = []

    from transformers import TrainerCallback

    class Reporter(TrainerCallback):  # stands in for wandb / tensorboard
        def on_log(self, args, state, control, logs=None, **kw):
            seen_by_later_callbacks.append(dict(logs or {}))

    trainer.add_callback(Reporter())
    trainer.train()
    assert callback.meter is None  # detached at the end
    assert any("routing/layer0/dead" in logs for logs in seen_by_later_callbacks)
    logged = [h for h in trainer.state.log_history if "routing/layer0/max_over_fair" in h]
    assert logged and "routing/layer1/load_entropy" in logged[0]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines and set(lines[0]["layers"]) == {"0", "1"}
    assert sum(lines[0]["layers"]["0"]["load"]) == pytest.approx(1, abs=1e-4)


def _olmoe(layers, seed=0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=layers,
                                         num_attention_heads=2, num_key_value_heads=2, num_experts=8,
                                         num_experts_per_tok=2, pad_token_id=1, eos_token_id=0, bos_token_id=0))
    for r in routers(model):
        torch.nn.init.normal_(r.weight, std=0.5)
    return model.train()


def test_per_layer_balance_loss_equals_transformers_aux_loss_for_one_layer():
    from moescope.train.telemetry import RoutingMeter

    model = _olmoe(1)
    meter = RoutingMeter(model, keep_logits_for_loss=True).attach()
    ids = torch.randint(2, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    balance, z = meter.router_losses()
    assert balance.item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert balance.requires_grad and z.requires_grad and z.item() > 0


def test_pooled_aux_loss_hides_opposite_imbalance_that_per_layer_balance_sees():
    from moescope.train.telemetry import RoutingMeter

    model = _olmoe(2)
    with torch.no_grad():  # layer 0 prefers experts 0-1, layer 1 prefers 6-7: pooled, the load looks even
        bias = torch.zeros(8, 32)
        routers(model)[0].weight.copy_(bias)
        routers(model)[1].weight.copy_(bias)
    hooks = []
    for layer, favoured in ((0, (0, 1)), (1, (6, 7))):  # add +3 to the favoured logits
        def shift(_m, _a, out, favoured=favoured):
            logits, _, _ = out
            logits = logits.clone()
            logits[:, list(favoured)] += 3.0
            w, i = torch.topk(torch.softmax(logits.float(), -1), 2)
            return logits, w.to(logits.dtype), i
        hooks.append(routers(model)[layer].register_forward_hook(shift))
    meter = RoutingMeter(model, keep_logits_for_loss=True).attach()
    ids = torch.randint(2, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    per_layer, _ = meter.router_losses()
    for h in hooks:
        h.remove()
    # Every token of each layer uses its 2 favoured experts (per-layer loss ~7, balanced: 2);
    # pooled over both layers, 4 of 8 experts look equally used and the penalty is halved.
    assert per_layer.item() > 6.5
    assert per_layer.item() > 1.8 * out.aux_loss.item()


def test_trainer_uses_the_chosen_balance_loss(corpus, tmp_path):
    rows = {}
    for balance in ("per_layer", "pooled"):
        out = tmp_path / balance
        train(micro(corpus, model={"balance": balance}, optim={"max_tokens": 8 * 32 * 10}), out)
        rows[balance] = _metrics(out)[-1]["train_aux_loss"]
    assert all(v is not None and 1.5 < v < 4 for v in rows.values())
    assert rows["per_layer"] != rows["pooled"]


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):
    """A micro model trained and exported once (shared: training and measuring cost seconds)."""
    from moescope.train.export import export

    tmp = tmp_path_factory.mktemp("export")
    train(micro(corpus), tmp / "run")
    return export(tmp / "run", tmp / "model", threads=1, permutations=10)


def test_export_writes_fp16_weights_a_measured_card_and_curves(exported):
    from safetensors import safe_open

    from moescope.capture.loading import load_model
    from moescope.train.card import render_card

    out = exported
    weights = next(out.glob("*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    model, _ = load_model(str(out))
    assert next(model.parameters()).dtype == torch.float32
    card = (out / "README.md").read_text()
    assert "unigram" in card and "Routing and the domains" in card and "training_curves.png" in card
    assert "on every layer separately" in card
    assert (out / "training_curves.png").stat().st_size > 10_000
    measured = json.loads((out / "card.json").read_text())
    for d in measured["perplexity"]["domains"].values():
        assert d["ppl"] > 0 and d["unigram_ppl"] > 0
    sig = measured["domain_signatures"]
    assert 0 < sig["chance_accuracy"] < 1 and len(sig["per_layer_accuracy"]) == 2
    assert measured["training"]["tokens"] > 0 and measured["corpus"]["validation_files"]
    assert card == render_card(measured)  # the README is card.json rendered


def test_remeasure_rewrites_the_card_from_the_shipped_files_only(exported, corpus, tmp_path):
    import shutil

    from moescope.train.card import render_card
    from moescope.train.export import remeasure

    out = tmp_path / "model"  # the exported files alone: the training facts come from card.json
    shutil.copytree(exported, out)
    before = json.loads((out / "card.json").read_text())
    (out / "README.md").write_text("stale")
    after = remeasure(out, corpus, threads=1, permutations=10)
    assert after["training"] == before["training"]
    assert after["perplexity"] == before["perplexity"]  # same weights, same validation split
    assert (out / "README.md").read_text() == render_card(after)


def test_remeasure_refuses_a_corpus_with_another_validation_split(corpus, tmp_path):
    from moescope.train.export import remeasure

    model = tmp_path / "model"
    model.mkdir()
    fingerprint = {"validation_files": {"text/code.val.jsonl": "0" * 64}}
    (model / "card.json").write_text(json.dumps({"training": {}, "corpus": fingerprint}))
    with pytest.raises(MoescopeError, match="validation split differs"):
        remeasure(model, corpus)
