"""Errors that carry an exit code: 2 = bad input, 1 = a job failed."""

from __future__ import annotations


class RetortError(Exception):
    """A user-facing failure. The CLI prints ``str(err)`` as one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(RetortError):
    """A config file or override is invalid (exit 2)."""


class JobFailed(RetortError):
    """A job ran and failed (exit 1); the message says which stage and where its logs are."""

    exit_code = 1
