"""SparseML recipes (the seed guide's staged YAML) mapped onto sparsefit stages.

    pruning_stage:
      obcq_modifiers:
        SparseGPTModifier: {sparsity: 0.5, sparsity_profile: owl, owl_m: 5, owl_lmbda: 0.08, ...}
    finetuning_stage:
      pruning_modifiers:
        ConstantPruningModifier: {targets: [...], start: 0}
      distillation_modifiers:
        OutputDistillationModifier: {targets: [...], comparison: square_head, orig_scale: 1.0, distill_scale: 1.0}

Every field without an equivalent lands in the recipe's `notes` (printed and saved), never
dropped silently. SparseML passes the teacher outside the recipe (`distill_teacher`); here it
defaults to the recipe's input model, which is what the guide distills from.
"""

from __future__ import annotations

import re
from typing import Any

from sparsefit.errors import UsageError

# Fields that need no counterpart: sparsefit always does what they ask for.
_IMPLIED = {
    "sequential_update": "sparsefit always prunes layer by layer with the pruned outputs of earlier blocks",
    "start": "stages run in order; 'start' of a one-stage modifier is its beginning",
    "quantize": "quantization is not part of this stage",
}
_LAYER_TARGET = re.compile(r"^re:(model\.)?layers\.\\d[+*]\$?$|^re:model\.layers\.\\d[+*]\$$")


def is_sparseml(data: Any) -> bool:
    if not isinstance(data, dict) or "stages" in data:
        return False
    stages = [v for k, v in data.items() if k.endswith("_stage")]
    top_modifiers = any(k.endswith("_modifiers") for k in data)
    return top_modifiers or (bool(stages) and all(isinstance(v, dict) for v in stages))


def convert(data: dict, name: str = "sparseml-recipe") -> dict:
    """A sparsefit recipe dict (not yet validated) with `notes` listing what could not be mapped."""
    notes: list[str] = []
    stages: list[dict] = []
    groups = {k: v for k, v in data.items() if k.endswith("_stage")} or {"stage": data}
    for stage_name, body in groups.items():
        if not isinstance(body, dict):
            raise UsageError(f"SparseML recipe: '{stage_name}' must be a mapping of *_modifiers")
        modifiers: dict[str, dict] = {}
        for group, mods in body.items():
            if group == "run_type":
                continue
            if not group.endswith("_modifiers") or not isinstance(mods, dict):
                notes.append(f"{stage_name}.{group}: not a modifier group; ignored")
                continue
            for mod_name, args in mods.items():
                if not isinstance(args or {}, dict):
                    raise UsageError(
                        f"SparseML recipe: {stage_name}.{group}.{mod_name} must map argument names to values"
                    )
                modifiers[mod_name] = args or {}
        stages += _convert_stage(stage_name, modifiers, notes)
    if not stages:
        raise UsageError(
            "SparseML recipe has no modifier sparsefit can run "
            "(SparseGPT/Wanda/Constant/Distillation/GPTQ/Quantization)"
        )
    return {"name": name, "description": "converted from a SparseML recipe", "stages": stages, "notes": notes}


def _convert_stage(stage_name: str, mods: dict[str, dict], notes: list[str]) -> list[dict]:
    out = []
    for mod_name in list(mods):
        if mod_name in ("SparseGPTModifier", "WandaPruningModifier"):
            out.append(_oneshot(stage_name, mod_name, mods.pop(mod_name), notes))
    train_mods = {k: mods.pop(k) for k in list(mods) if k in ("ConstantPruningModifier", "OutputDistillationModifier")}
    if train_mods:
        out.append(_finetune(stage_name, train_mods, notes))
    for mod_name in list(mods):
        if mod_name in ("GPTQModifier", "QuantizationModifier"):
            out.append(_quantize(stage_name, mod_name, mods.pop(mod_name), notes))
    for mod_name in mods:
        notes.append(f"{stage_name}.{mod_name}: no sparsefit equivalent; not run")
    return out


def _strings(value: Any, where: str) -> list[str]:
    """A name or a list of names (SparseML accepts both)."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
        raise UsageError(f"SparseML recipe: {where} must be a name or a list of names")
    return values


def _targets(value: Any, where: str, notes: list[str]) -> list[str] | None:
    """SparseML targets name decoder layers or weights; sparsefit targets regexes over linear names."""
    targets = _strings(value, f"{where}.targets")
    if not targets or all(_LAYER_TARGET.match(t) for t in targets):
        return None  # every decoder layer: sparsefit's default
    regexes = []
    for t in targets:
        if t.startswith("re:"):
            regexes.append(t[3:].removesuffix(".weight").removesuffix("\\.weight").removesuffix("$").rstrip("\\."))
        else:
            regexes.append(re.escape(t.removesuffix(".weight")))
    notes.append(f"{where}.targets: mapped to module regexes {regexes}")
    return regexes


def _oneshot(stage_name: str, mod_name: str, args: dict, notes: list[str]) -> dict:
    where = f"{stage_name}.{mod_name}"
    stage: dict[str, Any] = {
        "kind": "oneshot",
        "name": stage_name,
        "method": "sparsegpt" if mod_name == "SparseGPTModifier" else "wanda",
    }
    for key, value in args.items():
        if key == "sparsity":
            if isinstance(value, dict | list):
                notes.append(f"{where}.sparsity: per-layer sparsity lists are not mapped; using profile")
                continue
            stage["sparsity"] = value
        elif key == "mask_structure":
            stage["structure"] = "unstructured" if str(value).strip() in ("0:0", "unstructured") else str(value)
        elif key == "sparsity_profile":
            stage["profile"] = value or "uniform"
        elif key == "owl_m":
            stage["owl_m"] = value
        elif key == "owl_lmbda":
            stage["owl_lambda"] = value
        elif key == "block_size":
            stage["block_size"] = value
        elif key in ("percdamp", "dampening_frac"):
            stage["damp"] = value
        elif key == "targets":
            targets = _targets(value, where, notes)
            if targets:
                stage["targets"] = targets
        elif key == "ignore":
            stage["ignore"] = [
                t[3:] if t.startswith("re:") else re.escape(t) for t in _strings(value, f"{where}.ignore")
            ]
        elif key in _IMPLIED:
            notes.append(f"{where}.{key}: no field needed ({_IMPLIED[key]})")
        else:
            notes.append(f"{where}.{key}: no sparsefit equivalent; ignored")
    return stage


# SparseML / llm-compressor preset scheme names -> sparsefit schemes
_SCHEMES = {"W4A16": "w4a16", "W8A16": "w8a16", "W8A8": "w8a8-int8", "INT8": "w8a8-int8",
            "FP8_DYNAMIC": "w8a8-fp8", "FP8": "w8a8-fp8"}  # fmt: skip


def _typed(args: dict, key: str, kinds: tuple[type, ...], where: str, default: Any = None) -> Any:
    """`args[key]` (or `default`) when it is one of `kinds`, else a UsageError naming the field and the type."""
    value = args.get(key, default)
    if value is None or (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
        return value
    names = " or ".join({bool: "true/false", int: "an integer", float: "a number", str: "a name", dict: "a mapping"}[k]
                        for k in kinds)  # fmt: skip
    raise UsageError(f"SparseML recipe: {where}.{key} must be {names}, got {value!r}")


def _scheme_of_group(group: Any, where: str, notes: list[str]) -> tuple[str, int | None]:
    """(scheme, group size) of a `config_groups` entry: its weights' bits and type, quantized inputs or not."""
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise UsageError(f"SparseML recipe: {where} must give 'weights' (num_bits, type, strategy, ...)")
    weights = group["weights"]
    inputs = _typed(group, "input_activations", (dict,), where)
    bits = _typed(weights, "num_bits", (int,), f"{where}.weights", 8)
    kind = _typed(weights, "type", (str,), f"{where}.weights", "int")
    if _typed(weights, "symmetric", (bool,), f"{where}.weights") is False:
        notes.append(f"{where}.weights.symmetric: false is not mapped; symmetric (zero stays exact) is used")
    if inputs:
        scheme = "w8a8-fp8" if kind == "float" else "w8a8-int8"
        if bits != 8 or _typed(inputs, "num_bits", (int,), f"{where}.input_activations", 8) != 8:
            raise UsageError(f"SparseML recipe: {where}: only 8-bit weights with 8-bit activations are supported")
        return scheme, None
    if kind != "int" or bits not in (4, 8):
        raise UsageError(f"SparseML recipe: {where}: weight-only schemes are 4- or 8-bit integers here")
    strategy = _typed(weights, "strategy", (str,), f"{where}.weights")
    return ("w4a16" if bits == 4 else "w8a16"), (weights.get("group_size") if strategy == "group" else 0)


def _quantize(stage_name: str, mod_name: str, args: dict, notes: list[str]) -> dict:
    where = f"{stage_name}.{mod_name}"
    stage: dict[str, Any] = {"kind": "quantize", "name": f"{stage_name}-quantize",
                             "method": "gptq" if mod_name == "GPTQModifier" else "rtn"}  # fmt: skip
    for key, value in args.items():
        if key == "scheme":
            if isinstance(value, str) and value.upper() in _SCHEMES:
                stage["scheme"] = _SCHEMES[value.upper()]
                if value.upper() == "FP8":
                    notes.append(f"{where}.scheme: FP8 with static activation scales maps to dynamic ones (w8a8-fp8)")
            else:
                raise UsageError(f"SparseML recipe: {where}.scheme '{value}' is not one of {', '.join(_SCHEMES)}")
        elif key == "config_groups":
            groups = list((value or {}).values()) if isinstance(value, dict) else []
            if len(groups) != 1:
                raise UsageError(f"SparseML recipe: {where}.config_groups must hold exactly one group here")
            stage["scheme"], group_size = _scheme_of_group(groups[0], f"{where}.config_groups", notes)
            if group_size is not None:
                stage["group_size"] = group_size
            targets = _targets(groups[0].get("targets"), f"{where}.config_groups", notes) if groups[0] else None
            if targets and targets != ["Linear"]:
                stage["targets"] = targets
        elif key in ("percdamp", "dampening_frac"):
            stage["damp"] = value
        elif key == "block_size":
            stage["block_size"] = value
        elif key == "ignore":
            ignore = [t[3:] if t.startswith("re:") else re.escape(t) for t in _strings(value, f"{where}.ignore")]
            ignore = [t for t in ignore if t not in ("lm_head", "re:.*lm_head")]  # never quantized here
            if ignore:
                stage["ignore"] = ignore
        elif key == "targets":
            targets = [t for t in _strings(value, f"{where}.targets") if t != "Linear"]
            mapped = _targets(targets, where, notes) if targets else None
            if mapped:
                stage["targets"] = mapped
        elif key in _IMPLIED:
            notes.append(f"{where}.{key}: no field needed ({_IMPLIED[key]})")
        else:
            notes.append(f"{where}.{key}: no sparsefit equivalent; ignored")
    return stage


def _finetune(stage_name: str, mods: dict[str, dict], notes: list[str]) -> dict:
    stage: dict[str, Any] = {"kind": "finetune", "name": stage_name, "masks": "zeros"}
    constant = mods.get("ConstantPruningModifier")
    if constant is not None:
        for key, value in constant.items():
            if key == "targets":
                targets = _targets(value, f"{stage_name}.ConstantPruningModifier", notes)
                if targets:
                    stage["targets"] = targets
            elif key not in ("start", "end"):
                notes.append(f"{stage_name}.ConstantPruningModifier.{key}: no sparsefit equivalent; ignored")
    else:
        stage["masks"] = "none"
        notes.append(f"{stage_name}: no ConstantPruningModifier, so pruned weights are not held at zero")
    distill = mods.get("OutputDistillationModifier")
    if distill is not None:
        stage["teacher"] = "input"
        notes.append(
            f"{stage_name}.OutputDistillationModifier: teacher = the recipe's input model (SparseML's distill_teacher)"
        )
        comparison = _typed(distill, "comparison", (str,), f"{stage_name}.OutputDistillationModifier", "square_head")
        weight_key = {"square_head": "square_head_weight", "kl_divergence": "kl_weight"}.get(comparison)
        if weight_key is None:
            raise UsageError(
                f"{stage_name}.OutputDistillationModifier.comparison '{comparison}' is not supported; "
                "use square_head or kl_divergence"
            )
        stage[weight_key] = distill.get("distill_scale", 1.0)
        stage["ce_weight"] = distill.get("orig_scale", 1.0)
        if "temperature" in distill:
            stage["temperature"] = distill["temperature"]
        layers = distill.get("targets")
        if layers and comparison == "square_head" and _targets(layers, f"{stage_name}.OutputDistillationModifier", []):
            notes.append(
                f"{stage_name}.OutputDistillationModifier.targets {layers}: square-head uses every decoder layer"
            )
        for key in distill:
            if key not in ("targets", "comparison", "orig_scale", "distill_scale", "temperature", "start", "end"):
                notes.append(f"{stage_name}.OutputDistillationModifier.{key}: no sparsefit equivalent; ignored")
    return stage
