"""`${name}` variables with defaults, and `--set` overrides (a variable, or STAGE.FIELD)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from sparsefit.errors import UsageError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["sparsity=0.7", "02-finetune.max_steps=20"]` -> typed values (YAML scalars: 0.7 is a float)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set takes KEY=VALUE (got '{item}'), e.g. --set sparsity=0.7")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def substitute(node: Any, variables: dict[str, Any], where: str = "recipe") -> Any:
    """Replace `${name}` everywhere in a parsed YAML tree; a string that is only `${name}` keeps the value's type."""
    if isinstance(node, dict):
        return {k: substitute(v, variables, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, variables, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node
    for name in _VAR.findall(node):
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise UsageError(
                f"{where}: variable '${{{name}}}' is not defined (variables: {known}); add it to 'variables'"
            )
    whole = _VAR.fullmatch(node)
    if whole:
        return variables[whole[1]]
    return _VAR.sub(lambda m: str(variables[m[1]]), node)


def apply_overrides(data: dict, sets: dict[str, Any]) -> dict:
    """Variables first (`name=value`), then stage fields (`STAGE.FIELD=value`, STAGE a name or 1-based index)."""
    data = dict(data)
    variables = dict(data.get("variables") or {})
    stage_sets = {}
    for key, value in sets.items():
        if "." in key:
            stage_sets[key] = value
        elif key in variables:
            variables[key] = value
        else:
            known = ", ".join(sorted(variables)) or "none"
            raise UsageError(
                f"--set {key}: the recipe has no variable '{key}' (variables: {known}); or use STAGE.FIELD"
            )
    data["variables"] = variables
    data = {**substitute({k: v for k, v in data.items() if k != "variables"}, variables), "variables": variables}
    stages = data.get("stages") or []
    for key, value in stage_sets.items():
        ref, field = key.rsplit(".", 1)
        index = _stage_index(stages, ref)
        stages[index] = {**stages[index], field: value}
    return data


def _stage_index(stages: list, ref: str) -> int:
    names = [s.get("name") or f"{i + 1:02d}-{s.get('kind')}" for i, s in enumerate(stages) if isinstance(s, dict)]
    if ref.isdigit() and 1 <= int(ref) <= len(stages):
        return int(ref) - 1
    if ref in names:
        return names.index(ref)
    raise UsageError(f"--set {ref}.FIELD: no stage '{ref}' (stages: {', '.join(names)}, or 1..{len(stages)})")
