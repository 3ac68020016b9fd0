"""Validation of typed options: pydantic errors become one line that names the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

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


MAX_YAML_BYTES = 1 << 20  # recipes and profile files are a few KB; anything this large is a mistake
MAX_YAML_NODES = 100_000  # after aliases are expanded: an alias bomb stops here, before any work


def load_yaml(path: str | Path, label: str) -> Any:
    """Parse a YAML (or JSON) file safely: size-limited, UTF-8, plain data only (`safe_load`), and
    refusing documents whose aliases would expand past `MAX_YAML_NODES` nodes."""
    import yaml

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UsageError(f"{label} '{path}' is {size} bytes; the limit is {MAX_YAML_BYTES} (is it the right file?)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{label} '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise UsageError(
                f"{label} '{path}' expands to more than {MAX_YAML_NODES} values through its aliases (&/*); "
                "write the values out"
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"{label} '{path}' does not parse as YAML: {str(err).splitlines()[0]}") from None


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Nodes in the document once every alias is copied out (aliases share node objects)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a recursive alias counts once instead of forever
        value = node.value
        if isinstance(value, list):
            children = [c for pair in value for c in (pair if isinstance(pair, tuple) else (pair,))]
            memo[key] = 1 + sum(_expanded_size(c, memo) for c in children)
    return memo[key]
