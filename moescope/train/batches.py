"""Training and validation windows from a corpus directory written by `moescope data`.

Training batch `step` is a pure function of (seed, step): a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moescope.errors import MoescopeError


class TokenCorpus:
    """Memory-mapped token files of a corpus directory, per domain and split."""

    def __init__(self, corpus_dir: str | Path, domains: tuple[str, ...] | None = None, mixing: str = "proportional") -> None:
        self.dir = Path(corpus_dir)
        info_path = self.dir / "corpus.json"
        if not info_path.exists():
            raise MoescopeError(f"{self.dir} is not a corpus directory (no corpus.json); build one with `moescope data --out {self.dir}`")
        self.info = json.loads(info_path.read_text(encoding="utf-8"))
        available = [d["name"] for d in self.info["domains"]]
        self.domains = tuple(domains) if domains else tuple(available)
        missing = [d for d in self.domains if d not in available]
        if missing:
            raise MoescopeError(f"corpus {self.dir} has no domain {missing[0]!r}; it has {', '.join(available)}")
        self._tokens = {
            (d, split): np.memmap(self.dir / "tokens" / f"{d}.{split}.bin", dtype=np.uint16, mode="r")
            for d in self.domains
            for split in ("train", "val")
        }
        sizes = np.array([len(self._tokens[(d, "train")]) for d in self.domains], dtype=np.float64)
        if mixing not in ("proportional", "uniform"):
            raise MoescopeError(f"data.mixing must be 'proportional' or 'uniform', not {mixing!r}")
        # Proportional mixing never replays a small domain (dialogue is ~0.5% of the corpus)
        # dozens of times over; uniform mixing is there for controlled comparisons.
        self.weights = sizes / sizes.sum() if mixing == "proportional" else np.full(len(sizes), 1 / len(sizes))
        self._unigram_logp: np.ndarray | None = None

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def tokens(self, domain: str, split: str) -> np.ndarray:
        return self._tokens[(domain, split)]

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64 windows; domains mixed uniformly, offsets uniform."""
        rng = np.random.default_rng([seed, step])
        domains = rng.choice(len(self.domains), size=batch_size, p=self.weights)
        rows = []
        for d in domains:
            arr = self._tokens[(self.domains[d], "train")]
            start = int(rng.integers(0, len(arr) - seq_len - 1))
            rows.append(np.asarray(arr[start : start + seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def unigram_logp(self, vocab_size: int) -> np.ndarray:
        """Add-one-smoothed unigram log-probabilities (nats) fit on every domain's train tokens."""
        if self._unigram_logp is None:
            counts = np.zeros(vocab_size, dtype=np.float64)
            for d in self.domains:
                counts += np.bincount(self._tokens[(d, "train")], minlength=vocab_size)[:vocab_size]
            self._unigram_logp = np.log((counts + 1) / (counts.sum() + vocab_size))
        return self._unigram_logp

    def val_windows(self, domain: str, seq_len: int, max_tokens: int) -> torch.Tensor:
        """Non-overlapping (n, seq_len + 1) windows from the start of a domain's validation split."""
        arr = self._tokens[(domain, "val")]
        n = min(max_tokens, len(arr) - 1) // seq_len
        if n < 1:
            raise MoescopeError(f"the validation split of {domain!r} has fewer than {seq_len + 1} tokens")
        idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        return torch.from_numpy(np.asarray(arr[: n * seq_len + 1], dtype=np.int64)[idx])
