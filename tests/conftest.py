"""Shared fixtures: a tiny tokenizer and tiny MoE models saved like real checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "What is 12 times 7? It is 84. Once upon a time a lighthouse keeper watched the sea. "
    "The Nile is the longest river in Africa. <script>alert('x')</script> \"quotes\" & ampersands. "
    "Ünïcödé wörds, émojis 🙂 and 中文 text. "
) * 20


def build_tokenizer(path: Path, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on CORPUS, saved in HF format; returns the fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", model_max_length=64)
    fast.save_pretrained(path)
    return fast


def build_tiny_olmoe(vocab_size: int, *, layers: int = 3, experts: int = 8, top_k: int = 2, seed: int = 0):
    """A tiny OLMoE with non-degenerate random routing."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=experts, num_experts_per_tok=top_k,
                      pad_token_id=1, eos_token_id=0, bos_token_id=0, max_position_embeddings=64)
    model = OlmoeForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A directory holding a tiny OLMoE checkpoint (safetensors) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-olmoe")
    tok = build_tokenizer(path)
    model = build_tiny_olmoe(len(tok))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded from tiny_dir through moescope's loader."""
    from moescope.capture.loading import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for one test module (reused when one is already running)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'moescope[ray]')")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 << 20)
    yield ray
    if started:
        ray.shutdown()
