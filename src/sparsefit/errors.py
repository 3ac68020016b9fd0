"""Errors that reach the user as one line, never as a stack trace."""


class SparsefitError(Exception):
    """A failure sparsefit can explain in one line (exit code 1)."""

    exit_code = 1


class UsageError(SparsefitError):
    """Bad input from the user: a path, a name, a flag value (exit code 2)."""

    exit_code = 2
