"""The errors of local serving: a server that fails, does not start, or refuses an adapter."""

from __future__ import annotations

from pathlib import Path

from ...errors import TRPromptError


class ServerError(TRPromptError, RuntimeError):
    """Base class of serving errors."""


class ServerStartError(ServerError):
    """The server exited or did not become healthy in time.

    Attributes:
        log_path: the server log, kept on disk.
        returncode: the server's exit status, or None if it was killed for the timeout.
    """

    def __init__(self, message: str, *, log_path: Path | None = None, returncode: int | None = None):
        super().__init__(message)
        self.log_path = log_path
        self.returncode = returncode


class AdapterError(ServerError):
    """A LoRA adapter could not be loaded, unloaded or addressed."""
