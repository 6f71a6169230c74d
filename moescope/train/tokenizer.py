"""Byte-level BPE tokenizer for the built-in model: training, saving, tokenizing, baseline.

The tokenizer is GPT-2 style: text is split with the ByteLevel pre-tokenizer (no prefix space
is added, so decoding gives back the exact text), and every byte is in the initial alphabet,
so any string can be encoded. ``<|endoftext|>`` (id 0) ends documents and doubles as BOS;
``<|pad|>`` (id 1) pads batches.

Offsets: the ByteLevel post-processor runs with ``trim_offsets=True``, so the span of a token
such as "Ġthe" in " the" covers only "the", not the space before it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = [
    "EOS_TOKEN", "PAD_TOKEN", "MODEL_MAX_LENGTH", "TOKEN_DTYPE",
    "train_tokenizer", "save_tokenizer", "encode_documents", "unigram_perplexities",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MODEL_MAX_LENGTH = 1024
TOKEN_DTYPE = np.dtype("<u2")  # little-endian uint16: vocabularies up to 65,536 entries
TRIM_OFFSETS = True


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (specials and 256 bytes included).

    ``length`` (number of texts) only feeds the trainer's progress estimate. Pair counts are
    merged into totals before any merge is chosen and ties are broken by the pair itself, so
    the result does not depend on the number of threads (checked in tests/test_corpus.py and
    by building twice with RAYON_NUM_THREADS=1 and 2; see docs/data.md).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=TRIM_OFFSETS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids 0 and 1, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> list[Path]:
    """Save ``tok`` so ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it.

    Returns the files written (tokenizer.json and tokenizer_config.json).
    """
    from transformers import PreTrainedTokenizerFast  # slow import, only needed here

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # decode must return the exact text
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    return sorted(Path(p) for p in fast.save_pretrained(str(out_dir)) if Path(p).is_file())


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token ids of ``texts`` concatenated, each document followed by the EOS id.

    Returns a 1-D ``TOKEN_DTYPE`` array (its length is the split's token count).
    """
    eos = tok.token_to_id(EOS_TOKEN)
    if tok.get_vocab_size() > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocabulary of {tok.get_vocab_size()} does not fit {TOKEN_DTYPE}")
    parts: list[np.ndarray] = []
    for start in range(0, len(texts), 256):  # batches bound the memory of the Encoding objects
        for enc in tok.encode_batch(list(texts[start : start + 256]), add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=TOKEN_DTYPE))
            parts.append(np.asarray([eos], dtype=TOKEN_DTYPE))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)


def unigram_perplexities(
    train_ids: Sequence[np.ndarray], val_ids: dict[str, np.ndarray], vocab_size: int
) -> tuple[dict[str, float], float]:
    """Perplexity of an add-one-smoothed unigram model fit on all ``train_ids`` pooled.

    p(t) = (count(t) + 1) / (N + V) over the whole vocabulary, EOS tokens included. Returns
    (per-key perplexity of ``val_ids``, perplexity of all ``val_ids`` pooled), in tokens:
    exp of the mean negative log-probability per token.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in train_ids:
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    log_p = np.log(counts + 1.0) - np.log(float(counts.sum() + vocab_size))
    per_key = {k: float(np.exp(-log_p[v].mean())) if len(v) else float("nan") for k, v in val_ids.items()}
    pooled = np.concatenate(list(val_ids.values())) if val_ids else np.zeros(0, dtype=TOKEN_DTYPE)
    return per_key, float(np.exp(-log_p[pooled].mean())) if len(pooled) else float("nan")
