"""Errors that reach the user as one line, never as a stack trace."""


class SparsefitError(Exception):
    """A failure sparsefit can explain in one line (exit code 1)."""

    exit_code = 1


class UsageError(SparsefitError):
    """Bad input from the user: a path, a name, a flag value (exit code 2)."""

    exit_code = 2


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
