"""Synthetic tagged traces with planted POS-dependent routing, for the POS analysis's known-answer tests."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pyarrow as pa

TAGS = ("NOUN", "VERB", "DET", "ADJ", "PUNCT")
TAG_P = (0.35, 0.25, 0.2, 0.12, 0.08)
PAIRS = np.array(list(combinations(range(8), 2)), dtype=np.uint8)  # the 28 expert pairs of E=8, k=2


def synthetic(kind: str, *, n_tokens: int = 3000, seq_len: int = 30, moe_layers=(1, 3, 5, 7),
              planted=(1, 2), strength: float = 0.8, vocab: int = 200, seed: int = 0) -> dict:
    """tokens (with upos), routes and the model description of a synthetic trace, E=8, k=2.

    kind "planted": at the layer indices `planted` (into moe_layers) each tag sends a token to
        its own expert pair with probability `strength`, else to a random pair; other layers
        route uniformly; token ids are independent of tags.
    kind "null": every layer routes uniformly at random, whatever the tag.
    kind "word_form": each token id has one tag and one fixed random pair per layer: routing
        depends only on the token id, and the tag is a function of it.
    kind "identity": routing follows the token id (its own pair per layer with probability
        `strength`, else a random pair) and so does the tag (each id's own tag with probability
        0.7, else a random one), but given the id the tag says nothing about routing.
    kind "sentence": each sentence has its own expert pair per layer (each token goes there with
        probability `strength`) and its own dominant tag (each token's tag with probability 0.8):
        routing predicts the tag only through the sentence, which a token-level split leaks.
    """
    rng = np.random.default_rng(seed)
    L = len(moe_layers)
    if kind == "word_form":
        id_tag = rng.choice(len(TAGS), size=vocab, p=TAG_P)
        id_pair = rng.integers(0, len(PAIRS), size=(vocab, L))
        token_id = rng.integers(0, vocab, size=n_tokens)
        y, pair = id_tag[token_id], id_pair[token_id]
    elif kind == "identity":
        id_tag = rng.choice(len(TAGS), size=vocab, p=TAG_P)
        id_pair = rng.integers(0, len(PAIRS), size=(vocab, L))
        token_id = rng.integers(0, vocab, size=n_tokens)
        y = np.where(rng.random(n_tokens) < 0.7, id_tag[token_id], rng.choice(len(TAGS), size=n_tokens, p=TAG_P))
        pair = np.where(rng.random((n_tokens, L)) < strength, id_pair[token_id],
                        rng.integers(0, len(PAIRS), size=(n_tokens, L)))
    elif kind == "sentence":
        sent = np.arange(n_tokens) // seq_len
        n_sent = int(sent.max()) + 1
        sent_tag = rng.choice(len(TAGS), size=n_sent, p=TAG_P)
        sent_pair = rng.integers(0, len(PAIRS), size=(n_sent, L))
        token_id = rng.integers(0, vocab, size=n_tokens)
        y = np.where(rng.random(n_tokens) < 0.8, sent_tag[sent], rng.choice(len(TAGS), size=n_tokens, p=TAG_P))
        pair = np.where(rng.random((n_tokens, L)) < strength, sent_pair[sent],
                        rng.integers(0, len(PAIRS), size=(n_tokens, L)))
    else:
        y = rng.choice(len(TAGS), size=n_tokens, p=TAG_P)
        token_id = rng.integers(0, vocab, size=n_tokens)
        pair = rng.integers(0, len(PAIRS), size=(n_tokens, L))
        if kind == "planted":
            for layer in planted:
                preferred = rng.choice(len(PAIRS), size=len(TAGS), replace=False)
                hit = rng.random(n_tokens) < strength
                pair[hit, layer] = preferred[y[hit]]
        elif kind != "null":
            raise ValueError(kind)
    seq_id = np.arange(n_tokens) // seq_len
    pos = np.arange(n_tokens) % seq_len
    tokens = pa.table({
        "seq_id": pa.array(seq_id, pa.uint32()), "pos": pa.array(pos, pa.uint32()),
        "token_id": pa.array(token_id, pa.uint32()), "phase": ["prompt"] * n_tokens,
        "upos": pa.array([TAGS[i] for i in y], pa.string()),
    })
    experts = PAIRS[pair].reshape(-1, 2)  # token-major, then layer
    offsets = pa.array(np.arange(0, 2 * len(experts) + 1, 2, dtype=np.int32))
    routes = pa.table({
        "seq_id": pa.array(np.repeat(seq_id, L), pa.uint32()), "pos": pa.array(np.repeat(pos, L), pa.uint32()),
        "layer": pa.array(np.tile(np.asarray(moe_layers), n_tokens), pa.uint16()),
        "experts": pa.ListArray.from_arrays(offsets, pa.array(experts.ravel(), pa.uint8())),
    })
    return {"tokens": tokens, "routes": routes,
            "model": {"n_experts": 8, "top_k": 2, "moe_layers": list(moe_layers)}}
