"""User-facing errors: one line that says what is wrong and what to do.

The CLI prints ``MoescopeError`` messages without a traceback and exits non-zero; any other
exception is a bug in moescope and keeps its traceback.
"""
from __future__ import annotations


class MoescopeError(Exception):
    """An error caused by the user's input or environment, with the fix in its message."""

    exit_code: int = 2


class UnsupportedModelError(MoescopeError):
    """The model has no MoE layers moescope knows how to read."""


class TraceError(MoescopeError):
    """A trace directory is missing, incomplete, corrupt or belongs to another capture."""


class DataError(MoescopeError):
    """An input data file is missing, unreadable or malformed."""


class Interrupted(MoescopeError):
    """The user interrupted a command (Ctrl-C); exit status 130 like any interrupted program."""

    exit_code = 130
