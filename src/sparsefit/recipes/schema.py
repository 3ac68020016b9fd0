"""The recipe format: an ordered list of typed stages, validated before any work starts.

    name: gsm8k-50
    model: smollm2-135m
    variables: {sparsity: 0.5}
    report_to: tensorboard      # optional: every finetune stage's tracker (a stage may name its own)
    stages:
      - kind: oneshot
        method: sparsegpt
        sparsity: ${sparsity}
      - kind: finetune
        teacher: input          # the recipe's dense model; or stage:NAME, or any model spec
        square_head_weight: 1.0
      - kind: evaluate
        tasks: [perplexity, gsm8k-answer-ppl]

Each stage's fields are those of the Python API (`OneShotConfig`, `FinetuneConfig`, `QuantizeConfig`), so the
same names work everywhere; unknown fields are errors that name the stage and the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from sparsefit.config import MAX_SAMPLES, MAX_SEQ_LEN, describe_bound
from sparsefit.errors import UsageError
from sparsefit.pruning import OneShotConfig
from sparsefit.quantization.config import QuantizeConfig
from sparsefit.training import FinetuneConfig
from sparsefit.training.config import ReportTo

EVAL_TASKS = ("self-ppl", "perplexity", "gsm8k-answer-ppl", "gsm8k")
# Recipe and stage names become folder names: no separators, no leading dot (so no '..'), bounded length.
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str | None = None  # default: the kind ("finetune", "finetune-2" for a second one)


class OneshotStage(_Stage, OneShotConfig):
    kind: Literal["oneshot"]


class FinetuneStage(_Stage, FinetuneConfig):
    kind: Literal["finetune"]
    # a teacher reference: "input" (the recipe's model), "stage:NAME" (a stage's output) or a model spec


class QuantizeStage(_Stage, QuantizeConfig):
    """Mask-preserving quantization; the stage's folder is the compressed-tensors checkpoint."""

    kind: Literal["quantize"]


class EvaluateStage(_Stage):
    kind: Literal["evaluate"]
    tasks: list[Literal["self-ppl", "perplexity", "gsm8k-answer-ppl", "gsm8k"]] = ["perplexity", "gsm8k-answer-ppl"]
    dataset: str = "wikitext2"  # perplexity dataset
    seq_len: int = Field(2048, ge=2, le=MAX_SEQ_LEN)
    max_windows: int | None = Field(8, ge=1, le=10**9)
    limit: int | None = Field(200, ge=1, le=10**9)  # GSM8K rows
    chat: bool = False
    baseline: bool = False  # recovery in the report is relative to this evaluation (default: the first)
    # self-ppl: perplexity on held-out text sampled once from the recipe's input model (needs no dataset)
    self_samples: int = Field(16, ge=1, le=MAX_SAMPLES)
    self_seq_len: int = Field(256, ge=2, le=MAX_SEQ_LEN)
    missing_data: Literal["error", "skip"] = "error"  # skip: a task whose dataset is unreachable is reported skipped


class ExportStage(_Stage):
    kind: Literal["export"]
    # hf: a plain Hugging Face checkpoint (safetensors) with sparsity.json; or compact sparse storage
    format: Literal["hf", "sparse-bitmask", "sparse-24-bitmask"] = "hf"


Stage = Annotated[
    OneshotStage | FinetuneStage | QuantizeStage | EvaluateStage | ExportStage, Field(discriminator="kind")
]
STAGE_KINDS = ("oneshot", "finetune", "quantize", "evaluate", "export")
_STAGE_CLASSES = dict(zip(STAGE_KINDS, (OneshotStage, FinetuneStage, QuantizeStage, EvaluateStage, ExportStage)))


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "recipe"
    description: str = ""
    model: str = "smollm2-135m"
    variables: dict[str, str | int | float | bool | None] = {}
    stages: list[Stage] = Field(min_length=1)
    notes: list[str] = []  # what a conversion (e.g. from SparseML) could not map
    # the experiment tracker of every finetune stage that names none itself (FinetuneConfig.report_to)
    report_to: ReportTo | None = None

    @model_validator(mode="after")
    def _tracker(self) -> Recipe:
        for stage in self.stages:
            if self.report_to is not None and stage.kind == "finetune" and "report_to" not in stage.model_fields_set:
                stage.report_to = self.report_to
        return self

    def with_tracker(self, report_to: str) -> Recipe:
        """This recipe with every finetune stage reporting to `report_to` (`sparsefit run --report-to`)."""
        stages = [s.model_copy(update={"report_to": report_to}) if s.kind == "finetune" else s for s in self.stages]
        return self.model_copy(update={"report_to": report_to, "stages": stages})

    @model_validator(mode="after")
    def _names(self) -> Recipe:  # noqa: C901
        if not FOLDER_NAME.fullmatch(self.name):
            raise ValueError(
                f"recipe name '{self.name}' must be letters, digits, '_', '.', '-' (it names the run folder runs/NAME)"
            )
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name is None:
                count = sum(1 for s in self.stages if s.kind == stage.kind and s.name and s.name.startswith(stage.kind))
                stage.name = stage.kind if count == 0 and stage.kind not in seen else f"{stage.kind}-{count + 1}"
            if not FOLDER_NAME.fullmatch(stage.name):
                raise ValueError(
                    f"stage name '{stage.name}' must be letters, digits, '_', '.', '-' (it names a folder)"
                )
            if stage.name in seen:
                raise ValueError(f"two stages are named '{stage.name}'; give each stage its own name")
            seen.add(stage.name)
        for i, stage in enumerate(self.stages):
            teacher = getattr(stage, "teacher", None)
            if teacher and teacher.startswith("stage:"):
                ref = teacher.removeprefix("stage:")
                earlier = [s.name for s in self.stages[:i]]
                if ref not in earlier:
                    raise ValueError(f"stage '{stage.name}': teacher '{teacher}' names no earlier stage ({earlier})")
        return self


def stage_label(raw: dict, index: int) -> str:
    kind = raw.get("kind", "?") if isinstance(raw, dict) else "?"
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"stage {index + 1} ({name or kind})"


def validate_recipe(data: dict, source: str = "recipe") -> Recipe:
    """A Recipe, or a UsageError that names the stage and the field of every problem."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a recipe is a mapping with 'stages' (got {type(data).__name__})")
    for i, raw in enumerate(data.get("stages") or []):
        kind = raw.get("kind") if isinstance(raw, dict) else None
        if kind not in STAGE_KINDS:
            raise UsageError(
                f"{source}: {stage_label(raw, i)}: unknown stage kind '{kind}'; use one of: {', '.join(STAGE_KINDS)}"
            )
    try:
        return TypeAdapter(Recipe).validate_python(data)
    except ValidationError as err:
        raise UsageError(f"invalid {source}: " + "; ".join(_describe(e, data) for e in err.errors())) from None


def _describe(e: dict, data: dict) -> str:
    loc = list(e["loc"])
    stage = _STAGE_CLASSES.get(loc[2]) if len(loc) > 3 and loc[0] == "stages" else None
    msg = describe_bound(e, stage or Recipe, tuple(loc[3:]) if stage else ()) or e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field; check its spelling"
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        raw = (data.get("stages") or [])[loc[1]]
        rest = [str(x) for x in loc[3:]] if len(loc) > 2 and loc[2] in STAGE_KINDS else [str(x) for x in loc[2:]]
        field = ".".join(rest) or "(stage)"
        return f"{stage_label(raw, loc[1])} field '{field}': {msg}"
    return f"field '{'.'.join(str(x) for x in loc) or '(recipe)'}': {msg}"


__all__ = ["EVAL_TASKS", "EvaluateStage", "ExportStage", "FinetuneStage", "OneshotStage", "Recipe", "validate_recipe"]
