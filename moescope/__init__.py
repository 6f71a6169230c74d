"""moescope: record how mixture-of-experts language models route tokens, and analyse it.

The public Python API:

- :func:`record` - a context manager around any forward or generate call of a loaded model.
- :func:`capture_dataset` - run a whole text dataset through a model into a trace directory.
- :func:`open_trace` - DuckDB and Arrow access to a trace directory (``where=`` selects sequences).
- :func:`load_model` - a model and its tokenizer, loaded safely (None: the built-in model).
- :mod:`moescope.analysis` - every analysis, each returning a result with ``.df()`` and ``.save()``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from moescope.errors import MoescopeError

__all__ = ["__version__", "MoescopeError", "open_trace", "record", "capture_dataset", "load_model"]


def __getattr__(name: str):
    # Lazy imports: `import moescope` stays cheap (no torch) for analysis-only users.
    if name == "open_trace":
        from moescope.store.reader import open_trace

        return open_trace
    if name == "record":
        from moescope.capture.recorder import record

        return record
    if name == "capture_dataset":
        from moescope.capture.dataset import capture_dataset

        return capture_dataset
    if name == "load_model":
        from moescope.capture.loading import load_model

        return load_model
    if name == "analysis":
        import importlib

        return importlib.import_module("moescope.analysis")
    raise AttributeError(f"module 'moescope' has no attribute {name!r}")
