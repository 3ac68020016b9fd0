"""Validation of typed options: pydantic errors become one line that names the field."""

from __future__ import annotations

import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from sparsefit.errors import UsageError

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling"
        parts.append(f"{loc}: {msg}")
    return f"invalid {where}: " + "; ".join(parts)


def validate(model_cls: type[M], data: dict, where: str) -> M:
    """`model_cls(**data)`, or a UsageError naming `where` and each bad field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise UsageError(describe_validation_error(err, where)) from None


def check_regexes(patterns: list[str] | None) -> list[str] | None:
    """A pydantic field check: every pattern compiles (module-name targets / ignores)."""
    for pattern in patterns or []:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"bad regex '{pattern}': {err}") from None
    return patterns
