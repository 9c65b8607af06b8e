"""Error types that the CLI turns into one-line messages instead of tracebacks."""

from __future__ import annotations


class MoetrimError(Exception):
    """A failure the user can act on (bad checkpoint, mismatched profile, ...). CLI exit code 1."""

    exit_code = 1


class UsageError(MoetrimError):
    """The user asked for something invalid (bad ratio, unknown criterion, ...). CLI exit code 2."""

    exit_code = 2
