"""Offline multi-domain corpus for the built-in MoE model: selection, splits, files, summary.

``build_corpus`` reads seven locally installed sources (see ``corpus_sources``), picks up to
``chars_per_domain`` characters of training text and about ``val_fraction`` of that for
validation per domain, trains a byte-level BPE on the training text, tokenizes both splits and
writes::

    OUT/text/{domain}.{split}.jsonl    {"text", "domain", "source", "doc_id"} per line
    OUT/tokenizer/                     AutoTokenizer-loadable byte-level BPE
    OUT/tokens/{domain}.{split}.bin    uint16 little-endian ids, EOS after every document
    OUT/corpus.json                    this module's CorpusInfo (written last)

The same arguments give byte-identical files: listings are sorted, selection uses SHA-256 of
document groups (not Python's salted ``hash``), and no file carries a timestamp.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError
from moescope.train import corpus_sources
from moescope.train.corpus_sources import Document
from moescope.train.corpus_text import truncate_text
from moescope.train.tokenizer import (
    EOS_TOKEN, MODEL_MAX_LENGTH, PAD_TOKEN, TOKEN_DTYPE, TRIM_OFFSETS,
    encode_documents, save_tokenizer, train_tokenizer, unigram_perplexities,
)

__all__ = ["BUILDER_VERSION", "DOMAINS", "SPLITS", "CorpusInfo", "DomainInfo", "SplitStats",
           "build_corpus", "select_documents"]

BUILDER_VERSION = "1"
DOMAINS = ("code", "narrative", "drama", "technical", "dialogue", "definitions", "math")
SPLITS = ("train", "val")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SplitStats:
    """Size of one domain's split: documents, characters (code points), tokens (EOS included)."""

    documents: int
    characters: int
    tokens: int


@dataclass(frozen=True)
class DomainInfo:
    """One domain's provenance, sizes and unigram baseline (validation perplexity per token)."""

    name: str
    description: str
    licence: str
    licence_ref: str
    train: SplitStats
    val: SplitStats
    unigram_val_perplexity: float | None


@dataclass(frozen=True)
class CorpusInfo:
    """Summary of a built corpus, as written to OUT/corpus.json."""

    builder_version: str
    arguments: dict[str, int | float]
    python_version: str
    tokenizer: dict[str, int | str | bool]
    domains: tuple[DomainInfo, ...]
    unigram_train_tokens: int
    unigram_val_perplexity: float | None  # all domains' validation tokens pooled
    files: dict[str, str]  # path relative to OUT -> SHA-256 of its bytes

    def to_json(self) -> str:
        """The summary as indented JSON with a trailing newline."""
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, out_dir: Path) -> CorpusInfo:
        """Read OUT/corpus.json back (raises ``MoescopeError`` if there is none)."""
        path = Path(out_dir) / "corpus.json"
        if not path.is_file():
            raise MoescopeError(f"{path} not found; build the corpus with `moescope data --out {out_dir}`")
        raw = json.loads(path.read_text(encoding="utf-8"))
        domains = tuple(
            DomainInfo(**{**d, "train": SplitStats(**d["train"]), "val": SplitStats(**d["val"])})
            for d in raw.pop("domains")
        )
        return cls(domains=domains, **raw)


def _order_key(seed: int, domain: str, group: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{domain}\0{group}".encode()).digest()


def _fill(groups: list[list[Document]], start: int, budget: int) -> tuple[list[Document], int]:
    """Take whole documents from ``groups[start:]`` until ``budget`` characters are used.

    The document that would overflow is truncated to fit and ends the fill; the rest of its
    group is dropped rather than left for the other split. Returns (documents, next group).
    """
    taken: list[Document] = []
    used = 0
    i = start
    while i < len(groups) and used < budget:
        for doc in groups[i]:
            if used + len(doc.text) <= budget:
                taken.append(doc)
                used += len(doc.text)
                continue
            text = truncate_text(doc.text, budget - used)
            if text.strip():
                taken.append(Document(doc.doc_id, doc.group, doc.source, text))
            used = budget
            break
        i += 1
    return taken, i


def select_documents(
    docs: list[Document], domain: str, *, seed: int, chars_per_domain: int, val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into (train, val) by group, deterministically.

    Groups are visited in the order of SHA-256(seed, domain, group); validation takes groups
    first until ``val_fraction`` of min(available, ``chars_per_domain``) characters, then
    training takes the following groups up to ``chars_per_domain`` characters. No group, and
    hence no document, is in both splits.
    """
    by_group: dict[str, list[Document]] = {}
    for doc in docs:
        by_group.setdefault(doc.group, []).append(doc)
    order = sorted(by_group, key=lambda g: _order_key(seed, domain, g))
    groups = [by_group[g] for g in order]
    total = sum(len(d.text) for d in docs)
    val_budget = round(val_fraction * min(total, chars_per_domain))
    val, next_group = _fill(groups, 0, val_budget) if val_budget > 0 else ([], 0)
    train, _ = _fill(groups, next_group, chars_per_domain)
    return train, val


def _write_jsonl(path: Path, domain: str, docs: list[Document]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            record = {"text": d.text, "domain": domain, "source": d.source, "doc_id": d.doc_id}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_arguments(chars_per_domain: int, val_fraction: float, vocab_size: int) -> None:
    if chars_per_domain < 1000:
        raise MoescopeError(f"--chars-per-domain must be at least 1000, not {chars_per_domain}")
    if not 0.0 <= val_fraction < 1.0:
        raise MoescopeError(f"the validation fraction must be in [0, 1), not {val_fraction}")
    if not 258 + 16 <= vocab_size <= 65536:  # 256 bytes + 2 specials + some merges; uint16 ids
        raise MoescopeError(f"--vocab-size must be between 274 and 65536, not {vocab_size}")


def build_corpus(
    out_dir: Path,
    *,
    chars_per_domain: int = 4_000_000,
    val_fraction: float = 0.05,
    seed: int = 0,
    vocab_size: int = 8192,
    progress: Progress | None = None,
) -> CorpusInfo:
    """Build the corpus into ``out_dir`` and return its summary (also OUT/corpus.json).

    ``chars_per_domain`` caps each domain's training text in characters; validation gets about
    ``val_fraction`` of that. ``progress`` is called with a short description before each step.
    Raises ``DataError`` (one line, naming the package) if a source is not installed.
    """
    say = progress or (lambda _msg: None)
    _check_arguments(chars_per_domain, val_fraction, vocab_size)
    corpus_sources.check_sources()
    out_dir = Path(out_dir)
    for sub in ("text", "tokenizer", "tokens"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    selected: dict[str, dict[str, list[Document]]] = {}
    for domain in DOMAINS:
        say(f"reading {domain}")
        # math is generated: just enough for both budgets plus one document of slack
        need = int(chars_per_domain * (1 + val_fraction)) + corpus_sources.MAX_DOC_CHARS
        docs = corpus_sources.read_domain(domain, seed=seed, min_chars=need)
        train, val = select_documents(docs, domain, seed=seed, chars_per_domain=chars_per_domain,
                                      val_fraction=val_fraction)
        selected[domain] = {"train": train, "val": val}
        for split in SPLITS:
            path = out_dir / "text" / f"{domain}.{split}.jsonl"
            _write_jsonl(path, domain, selected[domain][split])
            written.append(path)

    say("training the tokenizer")
    train_texts = [d.text for domain in DOMAINS for d in selected[domain]["train"]]
    tok = train_tokenizer(train_texts, vocab_size, length=len(train_texts))
    del train_texts
    written.extend(save_tokenizer(tok, out_dir / "tokenizer"))

    say("tokenizing")
    ids: dict[tuple[str, str], np.ndarray] = {}
    for domain in DOMAINS:
        for split in SPLITS:
            arr = encode_documents(tok, [d.text for d in selected[domain][split]])
            path = out_dir / "tokens" / f"{domain}.{split}.bin"
            arr.astype(TOKEN_DTYPE, copy=False).tofile(path)
            written.append(path)
            ids[domain, split] = arr

    say("computing the unigram baseline")
    vocab = tok.get_vocab_size()
    per_domain, pooled = unigram_perplexities(
        [ids[d, "train"] for d in DOMAINS], {d: ids[d, "val"] for d in DOMAINS}, vocab)

    def stats(domain: str, split: str) -> SplitStats:
        docs = selected[domain][split]
        return SplitStats(len(docs), sum(len(d.text) for d in docs), int(len(ids[domain, split])))

    def finite(x: float) -> float | None:  # JSON has no NaN
        return round(x, 4) if math.isfinite(x) else None

    info = CorpusInfo(
        builder_version=BUILDER_VERSION,
        arguments={"chars_per_domain": chars_per_domain, "val_fraction": val_fraction,
                   "seed": seed, "vocab_size": vocab_size},
        python_version=".".join(map(str, sys.version_info[:3])),
        tokenizer={"path": "tokenizer", "vocab_size": vocab, "eos_token": EOS_TOKEN,
                   "eos_id": tok.token_to_id(EOS_TOKEN), "pad_token": PAD_TOKEN,
                   "pad_id": tok.token_to_id(PAD_TOKEN), "model_max_length": MODEL_MAX_LENGTH,
                   "trim_offsets": TRIM_OFFSETS, "token_dtype": "uint16 little-endian"},
        domains=tuple(
            DomainInfo(name=d, **asdict(corpus_sources.SOURCES[d]), train=stats(d, "train"),
                       val=stats(d, "val"), unigram_val_perplexity=finite(per_domain[d]))
            for d in DOMAINS
        ),
        unigram_train_tokens=int(sum(len(ids[d, "train"]) for d in DOMAINS)),
        unigram_val_perplexity=finite(pooled),
        files={p.relative_to(out_dir).as_posix(): _sha256(p)
               for p in sorted(written, key=lambda p: p.relative_to(out_dir).as_posix())},
    )
    (out_dir / "corpus.json").write_text(info.to_json(), encoding="utf-8", newline="\n")
    return info
