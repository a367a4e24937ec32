"""Errors the CLI turns into one line on stderr and exit code 2 (no traceback)."""


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class Diverged(Exception):
    """Training produced a non-finite loss or weights: the job stops and is recorded as diverged."""
