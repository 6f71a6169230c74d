"""Text datasets: .txt (a text per line), .jsonl (a `text` field plus metadata), .parquet.

A file is checked whole before any capture starts (so a malformed line 90,000 fails in a
second, not after an hour of capture), then streamed record by record.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moescope.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")
_SCALARS = (str, int, float, bool)
TRUNCATED = "truncated"  # the sequences column capture adds: whether the text was cut at max_length
# Columns of the sequences table that capture writes itself: an input field of the same name is
# kept under RENAME_PREFIX + name (with a note), never dropped or overwritten.
RESERVED_FIELDS = ("seq_id", "text", "generated_text", TRUNCATED)
RENAME_PREFIX = "input_"


@dataclass(frozen=True)
class Record:
    """One text of the input.

    Attributes:
        index: position among the records captured (0-based; skipped empty texts do not
            count): what shards' input ranges count.
        text: the text.
        metadata: the record's other fields (reserved names renamed, see RESERVED_FIELDS).
        seq_id: the record's index in the input file (empty texts count): the trace's seq_id.
    """

    index: int
    text: str
    metadata: dict[str, Any]
    seq_id: int = -1

    def __post_init__(self) -> None:
        if self.seq_id < 0:
            object.__setattr__(self, "seq_id", self.index)


@dataclass(frozen=True)
class DataSummary:
    path: str
    format: str
    n_records: int
    sha256: str
    fields: dict[str, str]  # metadata field -> type name (str, int, float, bool, json)
    n_empty: int
    renamed: dict[str, str] | None = None  # input field -> name in the trace (reserved names)


class TextDataset:
    """A text data file, validated on construction.

    Args:
        path: the file (.txt, .jsonl or .parquet).
        text_field: the field holding the text (jsonl / parquet).
        skip_empty: drop empty texts instead of refusing the file.
    """

    def __init__(self, path: str | Path, *, text_field: str = "text", skip_empty: bool = False) -> None:
        self.path = Path(path)
        self.text_field = text_field
        self.skip_empty = skip_empty
        self._renamed: dict[str, str] = {}
        if not self.path.exists():
            raise DataError(f"data file {self.path} does not exist")
        if self.path.is_dir():
            raise DataError(f"{self.path} is a directory; pass a .txt, .jsonl or .parquet file")
        self.format = self.path.suffix.lower()
        if self.format not in SUFFIXES:
            raise DataError(f"{self.path}: unknown data format {self.format!r}; use .txt, .jsonl or .parquet")
        self.summary = self._scan()

    # -- reading -------------------------------------------------------------------------
    def _raw(self) -> Iterator[tuple[int, str, Any]]:
        """(line or row number, 1-based, description, raw record) for every record."""
        if self.format == ".parquet":
            yield from self._parquet_rows()
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    line = line.rstrip("\n").rstrip("\r")
                    if self.format == ".txt":
                        yield lineno, "line", {"text": line}
                        continue
                    if not line.strip():
                        continue  # blank lines between JSON objects carry no record
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{self.path} line {lineno}: not valid JSON ({exc.msg}); fix or remove that line")
                    if not isinstance(obj, dict):
                        raise DataError(f"{self.path} line {lineno}: expected a JSON object with a {self.text_field!r} field")
                    yield lineno, "line", obj
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from exc
        except OSError as exc:
            raise DataError(f"cannot read {self.path}: {exc.strerror}") from exc

    def _parquet_rows(self) -> Iterator[tuple[int, str, Any]]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as exc:
            raise DataError(f"{self.path} is not a readable Parquet file ({exc})") from exc
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(f"{self.path} has no {self.text_field!r} column (columns: {', '.join(pf.schema_arrow.names)}); "
                            "pass --text-field NAME to read the text from another column")
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                row += 1
                yield row, "row", obj

    def _records(self) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
        for where, kind, obj in self._raw():
            text = obj.get(self.text_field)
            if not isinstance(text, str):
                fields = ", ".join(sorted(obj)[:8]) or "none"
                raise DataError(
                    f"{self.path} {kind} {where}: {self.text_field!r} is missing or not a string (fields: {fields}); "
                    "every record needs one: pass --text-field NAME if the text is in another field"
                )
            for key in obj:
                if key in RESERVED_FIELDS and key != self.text_field:
                    if RENAME_PREFIX + key in obj:
                        raise DataError(f"{self.path} {kind} {where}: fields {key!r} and {RENAME_PREFIX + key!r} both "
                                        f"present, and moescope writes {key!r} itself; rename one of them")
                    self._renamed[key] = RENAME_PREFIX + key
            meta = {_stored_name(k): v for k, v in obj.items() if k != self.text_field}
            yield where, kind, text, meta

    def _scan(self) -> DataSummary:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        n, n_empty = 0, 0
        fields: dict[str, str] = {}
        for where, kind, text, meta in self._records():
            if not text.strip():
                if not self.skip_empty:
                    raise DataError(f"{self.path} {kind} {where}: empty text; remove it or pass --skip-empty")
                n_empty += 1
                continue
            n += 1
            for key, value in meta.items():
                if value is None:
                    continue
                kind_name = type(value).__name__ if isinstance(value, _SCALARS) else "json"
                previous = fields.setdefault(key, kind_name)
                if previous != kind_name:
                    fields[key] = "float" if {previous, kind_name} == {"int", "float"} else "str"
        if n == 0:
            raise DataError(f"{self.path} holds no texts")
        return DataSummary(str(self.path), self.format.lstrip("."), n, digest.hexdigest(), fields, n_empty,
                           dict(self._renamed) or None)

    def notes(self) -> list[str]:
        """One-line notes about how the file is read (reserved field names renamed, empty texts skipped)."""
        out = [f"note: input field {old!r} is stored as {new!r} (moescope writes {old!r} itself)"
               for old, new in (self.summary.renamed or {}).items()]
        if self.summary.n_empty:
            out.append(f"note: {self.summary.n_empty:,} empty text(s) skipped; seq_id stays the record's index in the file")
        return out

    def __len__(self) -> int:
        return self.summary.n_records

    def __iter__(self) -> Iterator[Record]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Record]:
        """Records from the `start`-th (0-based, counting kept records) on."""
        index = 0
        for seq_id, (_where, _kind, text, meta) in enumerate(self._records()):
            if not text.strip():
                continue
            if index >= start:
                yield Record(index, text, self._normalise(meta), seq_id)
            index += 1

    def _normalise(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Metadata with one type per field across the file (so shards share a schema)."""
        out: dict[str, Any] = {}
        for key, kind in self.summary.fields.items():
            value = meta.get(key)
            if value is None:
                out[key] = None
            elif kind == "json":
                out[key] = json.dumps(value, ensure_ascii=False, sort_keys=True)
            elif kind == "str":
                out[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            elif kind == "float":
                out[key] = float(value)
            else:
                out[key] = value
        return out


def _stored_name(field: str) -> str:
    """The name an input field is stored under: reserved names get RENAME_PREFIX."""
    return RENAME_PREFIX + field if field in RESERVED_FIELDS else field
