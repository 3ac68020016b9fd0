"""Errors that reach the user as one line, never as a stack trace."""


class SparsefitError(Exception):
    """A failure sparsefit can explain in one line (exit code 1)."""

    exit_code = 1


class UsageError(SparsefitError):
    """Bad input from the user: a path, a name, a flag value (exit code 2)."""

    exit_code = 2


class Interrupted(SparsefitError):
    """A run stopped by a signal after saving what it could; exits with 128 + the signal number
    (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
