"""Typed options: validation whose errors name the field, and command-line flags derived from the
fields (name, type, default, help), so that each default lives in the config class alone."""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparsefit.errors import UsageError

M = TypeVar("M", bound=BaseModel)

# Upper bounds of the numeric options: far beyond any real run, so only a typo or a unit mix-up hits them
# (and is named at parse time instead of allocating, looping or overflowing later).
MAX_STEPS = 10**9  # optimizer steps, schedule points, step intervals
MAX_SEQ_LEN = 1 << 20  # tokens per sequence
MAX_SAMPLES = 1 << 20  # calibration sequences, statistics batches, sampled sequences
MAX_BATCH = 1 << 16  # sequences per batch, micro-batches per step
MAX_DIM = 1 << 20  # ranks, group sizes, column blocks: no layer of any model is this wide


def describe_validation_error(
    err: ValidationError,
    where: str,
    as_flags: bool = False,
    flattened: tuple[str, ...] = (),
    fields: frozenset[str] = frozenset(),
    model_cls: type[BaseModel] | None = None,
) -> str:
    """One line naming each bad field; with `as_flags`, a top-level field as its flag (`--seq-len`), and a
    field of a nested config in `flattened` (whose fields are flags of their own) as that flag. A check of
    the whole config names fields in its message: those of `fields` become flags there too."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        msg = describe_bound(e, model_cls) or e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling"
        if as_flags:
            msg = _fields_as_flags(msg, fields)
            if not e["loc"]:  # a check of the whole config: its message names the fields
                parts.append(msg)
                continue
            path = e["loc"][1:] if e["loc"][0] in flattened and len(e["loc"]) > 1 else e["loc"]
            loc = "--" + str(path[0]).replace("_", "-") + "".join(f".{x}" for x in path[1:])
        parts.append(f"{loc}: {msg}")
    return f"invalid {where}: " + "; ".join(parts)


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_WORDS = {"ge": "from", "gt": "above", "le": "to", "lt": "below"}


def describe_bound(e: dict, model_cls: type[BaseModel] | None, loc: tuple = ()) -> str | None:
    """For a number out of its field's range, the whole allowed range and the value given, e.g.
    "must be from 1 to 1000000000 (got 1e+30)"; None for any other error. The bounds are those of the
    field `loc` (default the error's) names in `model_cls`, else the one pydantic reports."""
    if e["type"] not in _BOUNDS:
        return None
    field = _field_of(model_cls, loc or e["loc"]) if model_cls is not None else None
    bounds = {}
    for m in getattr(field, "metadata", ()):
        for key in _WORDS:
            if getattr(m, key, None) is not None:
                bounds["low" if key[0] == "g" else "high"] = (_WORDS[key], getattr(m, key))
    if not bounds:  # the violated bound alone
        key = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}[e["type"]]
        bounds["low" if key[0] == "g" else "high"] = (_WORDS[key], next(iter((e.get("ctx") or {}).values()), "?"))
    low, high = bounds.get("low", (None, None)), bounds.get("high", (None, None))
    if (low[0], high[0]) == ("from", "to"):
        allowed = f"from {low[1]} to {high[1]}"
    else:
        words = {"from": "at least", "above": "above", "to": "at most", "below": "below"}
        allowed = " and ".join(f"{words[w]} {v}" for w, v in (low, high) if w)
    return f"must be {allowed} (got {e.get('input')!r})"


def _field_of(model_cls: type[BaseModel], loc: tuple) -> Any:
    """The FieldInfo that `loc` (an error's location: names, list indices) names in `model_cls`, through
    nested configs; None when it names none."""
    cls, found = model_cls, None
    for part in loc:
        if not isinstance(part, str):
            continue
        field = cls.model_fields.get(part) if cls is not None else None
        if field is None:
            return None
        found = field
        nested = _strip_none(field.annotation)
        cls = nested if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    return found


def _fields_as_flags(message: str, fields: frozenset[str]) -> str:
    """`kl_weight` -> `--kl-weight` for each field named in `message`: words with an underscore, and a
    single word after "set " (plain words such as "teacher" are English elsewhere)."""

    def flag(m: re.Match) -> str:
        return "--" + m.group(0).replace("_", "-") if m.group(0) in fields else m.group(0)

    message = re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b", flag, message)
    return re.sub(r"(?<=\bset )[a-z]+\b", flag, message)


def _field_names(model_cls: type[BaseModel], flattened: tuple[str, ...]) -> frozenset[str]:
    """The fields of `model_cls` and those of its nested configs in `flattened`: the names that have flags."""
    names = set(model_cls.model_fields)
    for name in flattened:
        nested = model_cls.model_fields[name].annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names |= set(nested.model_fields)
    return frozenset(names)


def validate(model_cls: type[M], data: dict, where: str, as_flags: bool = False, flattened: tuple[str, ...] = ()) -> M:
    """`model_cls(**data)`, or a UsageError naming `where` and each bad field (as a flag with `as_flags`)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        fields = _field_names(model_cls, flattened) if as_flags else frozenset()
        raise UsageError(describe_validation_error(err, where, as_flags, flattened, fields, model_cls)) from None


def add_flags(parser: Any, model_cls: type[BaseModel], names: list[str]) -> None:
    """One `--flag` per field in `names` of `model_cls` (an argparse parser or group).

    The flag's type, choices and help come from the field; its default is None, so an unset flag
    leaves the field's own default in force (`flag_values`). The help quotes that default unless
    the field's description already says what it is.
    """
    for name in names:
        field = model_cls.model_fields[name]
        kwargs: dict[str, Any] = {"default": None, "dest": name}
        annotation = _strip_none(field.annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(args)
            if all(isinstance(a, int) for a in args):  # e.g. Literal[16, 4]: parse the flag as a number
                kwargs["type"] = int
        elif origin is list:
            kwargs["nargs"] = "+"
            kwargs["type"] = args[0]
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        else:
            raise TypeError(f"{model_cls.__name__}.{name} has no flag form ({annotation}); add it by hand")
        if kwargs.get("type") in (int, float) and "choices" not in kwargs:
            kwargs["metavar"] = "N" if kwargs["type"] is int else "X"
        description = field.description or ""
        default = field.get_default()
        if "default" not in description and not (default is None or default is False or default == []):
            description = f"{description} (default {default})" if description else f"default {default}"
        kwargs["help"] = description.replace("%", "%%")
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def flag_values(args: argparse.Namespace, names: list[str]) -> dict:
    """The fields among `names` whose flags were given."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _strip_none(annotation: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def check_regexes(patterns: list[str] | None) -> list[str] | None:
    """A pydantic field check: every pattern compiles (module-name targets / ignores)."""
    for pattern in patterns or []:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"bad regex '{pattern}': {err}") from None
    return patterns


class LayerwiseOptions(BaseModel):
    """Options shared by the layer-by-layer commands (pruning, quantization): which linears change,
    the calibration data, and how the block forwards run."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf / nan in any float field is an error

    targets: list[str] | None = Field(
        None, description="regexes of layer names to change (default: every linear in the decoder blocks)"
    )
    ignore: list[str] = Field([], description="regexes of layer names to leave as they are")
    calib: str | None = Field(
        "gsm8k",
        description="calibration data: gsm8k | wikitext2 | file | hub id | self (sampled from the model) | none",
    )
    calib_split: str = Field("train", description="split of the calibration dataset")
    text_field: str = Field("text", description="field of .jsonl / hub rows holding the text")
    num_samples: int = Field(64, ge=1, le=MAX_SAMPLES, description="calibration sequences")
    # SparseGPT's refit fits the calibration text's statistics: on GSM8K alone, a 2:4 model loses much
    # more general text than one whose calibration also holds text the model writes, for a little of the
    # task (benchmarks/calibration.py).
    self_mix: int = Field(
        0,
        ge=0,
        le=MAX_SAMPLES,
        description="with a calibration dataset: sequences of seq_len tokens sampled from the model that join "
        "its num_samples, general text beside a task's (0: none)",
    )
    seq_len: int = Field(512, ge=2, le=MAX_SEQ_LEN, description="tokens per calibration sequence")
    seed: int = Field(0, ge=0, lt=2**32, description="calibration draw (torch, random and numpy all take it)")
    # 2 measured fastest of 1/2/4/8/16 with float32 block forwards and tied with 4 under native
    # bf16; smaller batches also hold less memory at each pause of the sequential order.
    batch_size: int = Field(2, ge=1, le=MAX_BATCH, description="calibration sequences per block forward")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype of the block forwards, statistics stay float32 (default auto: bfloat16 on a CPU with "
        "native bf16, else float32; float32 on GPUs)",
    )

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, v: list[str] | None) -> list[str] | None:
        return check_regexes(v)

    @model_validator(mode="after")
    def _self_mix(self) -> LayerwiseOptions:
        if self.self_mix and self.calib in (None, "self"):
            raise ValueError(
                f"self_mix adds sampled text to a calibration dataset, but calib is {self.calib or 'none'}: name a "
                "dataset, or raise num_samples with calib self"
            )
        return self


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
