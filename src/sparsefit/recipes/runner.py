"""`sparsefit run`: the stages of a recipe in order, each in `RUN_DIR/NN-name/`, resumable.

A stage is complete when its `stage.json` exists with the fingerprint of its configuration and
of its input model; a rerun skips complete stages and redoes a stage (and every later one)
whose configuration or input changed. A model-producing stage's folder is an HF checkpoint,
and the next stage loads from it, so a crash loses at most the stage in flight (a fine-tune
in flight resumes from its own last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import yaml

from sparsefit.atomic import check_replaceable, discard_dir, make_dir, mark, write_json, write_text
from sparsefit.outputs import claim_output
from sparsefit.recipes.report import write_report
from sparsefit.recipes.schema import (
    EvaluateStage,
    ExportStage,
    FinetuneStage,
    OneshotStage,
    QuantizeStage,
    Recipe,
    Stage,
)

STAGE_FILE = "stage.json"
# Stage fields that change nothing a later stage reads: a stage that differs only in them stays complete.
NOT_FINGERPRINTED = ("report_to",)


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / f"{index + 1:02d}-{name}"


def _fingerprint(stage_config: dict, input_model: str, input_stamp: str) -> str:
    text = json.dumps({"config": stage_config, "input": input_model, "stamp": input_stamp}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_recipe(recipe: Recipe, run_dir: str | Path, device: str | torch.device = "auto", progress: bool = True) -> dict:
    """Run (or resume) every stage; returns the report dict (also written as report.json / report.md).

    `run_dir` must be new, empty, or a run directory sparsefit wrote (then finished stages are kept);
    it is locked for the whole run.
    """
    from sparsefit.models import parse_device
    from sparsefit.training.trackers import check_tracker

    # a missing tracker library fails before the first stage
    for name in {recipe.report_to or "none", *(s.report_to for s in recipe.stages if isinstance(s, FinetuneStage))}:
        check_tracker(name)
    device = parse_device(device) if isinstance(device, str) else device
    with claim_output(run_dir, reuse=True, replaces=False, inputs=(recipe.model,)) as claim:
        run_dir = claim.path
        make_dir(run_dir)
        mark(run_dir, "recipe.yaml")
        return _run_stages(recipe, run_dir, device, progress)


def _run_stages(recipe: Recipe, run_dir: Path, device: torch.device, progress: bool) -> dict:
    write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    for note in recipe.notes:
        print(f"note: {note}", flush=True)

    current = recipe.model  # the model the next stage reads
    outputs: dict[str, str] = {}
    stamps = {current: "input"}  # model -> the run that made it (fingerprints, cached self-generated text)
    for i, stage in enumerate(recipe.stages):
        folder = stage_dir(run_dir, i, stage.name)
        config = stage.model_dump(mode="json", exclude=set(NOT_FINGERPRINTED))
        fingerprint = _fingerprint(config, current, stamps[current])
        done = _completed(folder, fingerprint)
        if done is not None:
            print(f"[{i + 1}/{len(recipe.stages)}] {stage.name}: complete, skipped", flush=True)
            record = done
        else:
            print(f"[{i + 1}/{len(recipe.stages)}] {stage.name} ({stage.kind}) on {current}", flush=True)
            _claim(folder, fingerprint)
            start = time.perf_counter()
            result = _run_stage(stage, recipe, current, outputs, stamps, folder, device, progress)
            record = {
                "name": stage.name,
                "kind": stage.kind,
                "input": current,
                "fingerprint": fingerprint,
                "seconds": time.perf_counter() - start,
                "result": result,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            mark(folder, STAGE_FILE)  # recorded first: a kill mid-write leaves only what is ours
            write_json(folder / STAGE_FILE, record)
        if stage.kind in ("oneshot", "finetune", "quantize", "export"):
            current = str(folder)
            stamps[current] = record["fingerprint"]
        outputs[stage.name] = str(folder)
    if recipe.report_to not in (None, "none"):
        _track_evaluations(recipe, run_dir)
    return write_report(run_dir, recipe)


def _track_evaluations(recipe: Recipe, run_dir: Path) -> None:
    """The evaluate stages' numbers as one tracker run in RUN_DIR/tracking: `eval/<metric>` at step =
    the stage's number, so dense -> pruned -> recovered reads as one curve. Rewritten whole from the
    stages' records by every invocation (a rerun that skipped them reports them again)."""
    from sparsefit.training.trackers import claim_tracking_dir, numeric, open_tracker

    claim_tracking_dir(run_dir, fresh=True)
    tracker = open_tracker(recipe.report_to, run_dir, {"recipe": recipe.name, "model": recipe.model})
    try:
        for i, stage in enumerate(recipe.stages):
            if isinstance(stage, EvaluateStage):
                result = json.loads((stage_dir(run_dir, i, stage.name) / STAGE_FILE).read_text())["result"]
                tracker.log({f"eval/{k}": v for k, v in numeric(result).items()}, i + 1)
    finally:
        tracker.close()


def _claim(folder: Path, fingerprint: str) -> None:
    """Start a stage in `folder`: keep what an interrupted run of the same stage left (a fine-tune
    checkpoint), discard anything made with another configuration or input. The fingerprint of
    the stage in flight sits beside its folder, which the stage may replace wholesale."""
    claim = folder.with_name(f".{folder.name}.fingerprint")
    same = claim.is_file() and claim.read_text() == fingerprint
    if folder.exists() and not same:
        check_replaceable(folder)  # only what sparsefit wrote there goes
        discard_dir(folder)
    mark(folder.parent, folder.name, claim.name)
    write_text(claim, fingerprint)
    make_dir(folder)
    mark(folder)


def _completed(folder: Path, fingerprint: str) -> dict | None:
    """The record of a stage that finished with this fingerprint (None otherwise, or when unreadable)."""
    path = folder / STAGE_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        print(f"warning: {path} is unreadable ({type(err).__name__}); the stage runs again", flush=True)
        return None
    if not isinstance(record, dict):
        print(f"warning: {path} is not a stage record; the stage runs again", flush=True)
        return None
    return record if record.get("fingerprint") == fingerprint else None


def _teacher_spec(teacher: str, recipe: Recipe, outputs: dict[str, str]) -> str:
    if teacher == "input":
        return recipe.model
    if teacher.startswith("stage:"):
        return outputs[teacher.removeprefix("stage:")]
    return teacher


def _run_stage(
    stage: Stage,
    recipe: Recipe,
    current: str,
    outputs: dict,
    stamps: dict,
    folder: Path,
    device: torch.device,
    progress: bool,
) -> dict:
    from sparsefit.export import export_checkpoint, read_sparsity, save_checkpoint, sparsity_summary
    from sparsefit.models import load_model_and_tokenizer

    def self_text(spec: str, num: int, seq_len: int, seed: int, loaded: tuple | None = None) -> torch.Tensor:
        stamp = stamps.get(spec, "external")
        return _self_text(folder.parent, spec, stamp, num, seq_len, seed, device, progress, loaded)

    if isinstance(stage, OneshotStage):
        from sparsefit.pruning import OneShotConfig, oneshot

        model, tok = load_model_and_tokenizer(current, "float32", "cpu")
        # Only the fields the recipe gave: the others keep their defaults, and the defaults' fallbacks
        # (calibration on self-generated text when the default dataset is out of reach).
        config = OneShotConfig(**stage.model_dump(exclude={"kind", "name"}, exclude_unset=True))
        calib = None
        if config.calib == "self":  # shared with a later stage that samples the same model alike
            calib = self_text(current, config.num_samples, config.seq_len, config.seed, (model, tok))
        report = oneshot(model, tok, config, device=device, calib=calib, progress=progress)
        save_checkpoint(model, tok, folder, {"pruning": report})
        return {"sparsity": report.sparsity.overall, "seconds": report.seconds, "phases": report.phases}
    if isinstance(stage, FinetuneStage):
        from sparsefit.training import FinetuneConfig, finetune
        from sparsefit.training.resume import finished_run

        fields = stage.model_dump(exclude={"kind", "name"})
        if fields.get("teacher"):
            fields["teacher"] = _teacher_spec(fields["teacher"], recipe, outputs)
        keys = ("steps", "tokens", "tokens_per_second", "final_loss", "sparsity", "revived_weights", "train_seconds")
        done = finished_run(folder)  # killed after the fine-tune published, before stage.json
        if done is not None:
            return {k: done[k] for k in keys}
        config = FinetuneConfig(**fields)
        tokens = None
        if config.sampled_rows:  # sampled from the teacher, or the model itself, as finetune would
            tokens = self_text(config.teacher or current, config.sampled_rows, config.seq_len, config.seed)
        model, tok = load_model_and_tokenizer(current, "float32", device)
        metrics = finetune(model, tok, config, folder, resume=True, progress=progress, device=device, self_text=tokens)
        return {k: metrics[k] for k in keys}
    if isinstance(stage, QuantizeStage):
        from sparsefit.export.compressed import save_quantized
        from sparsefit.quantization import QuantizeConfig, quantize

        model, tok = load_model_and_tokenizer(current, "float32", "cpu")
        config = QuantizeConfig(**stage.model_dump(exclude={"kind", "name"}, exclude_unset=True))
        result = quantize(model, tok, config, device=device, progress=progress)
        info = save_quantized(model, tok, folder, result)
        r = result.report
        return {**info, "revived_weights": r.revived_weights, "seconds": r.seconds, "phases": r.phases}
    if isinstance(stage, EvaluateStage):
        model, tok = load_model_and_tokenizer(current, "float32", device)
        # held-out text: seed 1234, unlike any training seed, always from the recipe's input model
        held_out = lambda: self_text(recipe.model, stage.self_samples, stage.self_seq_len, 1234)  # noqa: E731
        result = _evaluate(stage, model, tok, progress, held_out)
        recorded = (read_sparsity(current) or {}).get("sparsity", {}).get("overall") if Path(current).is_dir() else None
        result["sparsity"] = recorded if isinstance(recorded, float) else sparsity_summary(model)["overall"]
        result["model"] = current
        mark(folder, "eval.json")
        write_json(folder / "eval.json", result)
        return result
    if isinstance(stage, ExportStage):
        model, tok = load_model_and_tokenizer(current, "float32", "cpu")
        return export_checkpoint(model, tok, folder, current, stage.format, evaluation=_evaluation_of(current, outputs))
    raise TypeError(f"unknown stage {stage!r}")


def _evaluation_of(model: str, outputs: dict[str, str]) -> dict | None:
    """The numbers of the last evaluate stage of this run that measured `model` (for its model card)."""
    from sparsefit.export.card import evaluation_numbers

    found = None
    for folder in outputs.values():
        try:
            result = json.loads((Path(folder) / "eval.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and result.get("model") == model:
            found = evaluation_numbers(result)
    return found or None


def _self_text(
    run_dir: Path,
    spec: str,
    stamp: str,
    num: int,
    seq_len: int,
    seed: int,
    device: torch.device,
    progress: bool,
    loaded: tuple | None = None,
) -> torch.Tensor:
    """(num, seq_len) tokens sampled in float32 from model `spec`, once per run: stages asking the same
    model (same `stamp`: the run that made it) for the same text share one file, e.g. the pruning's
    calibration and the recovery's training text. `loaded`, when given, is `spec`'s (model, tokenizer)."""
    from sparsefit.data.self_generated import load_or_sample, sample_from_model
    from sparsefit.models import load_model_and_tokenizer

    key = hashlib.sha256(json.dumps([spec, stamp, num, seq_len, seed]).encode()).hexdigest()[:16]
    path = run_dir / f"self-text-{key}.safetensors"

    def sample() -> torch.Tensor:
        model, tok = loaded if loaded is not None else load_model_and_tokenizer(spec, "float32", device)
        ids = sample_from_model(model, tok, num, seq_len, seed=seed, progress=progress)
        mark(run_dir, path.name)  # recorded as the run's before it exists
        return ids

    model_config = loaded[0].config if loaded is not None else _model_config(spec)
    return load_or_sample(path, sample, vocab=model_config.vocab_size, shape=(num, seq_len))


def _model_config(spec: str):
    """The config of model `spec`, read without loading its weights."""
    from transformers import AutoConfig

    from sparsefit.models import resolve_model
    from sparsefit.models.loading import _load_error

    resolved = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(resolved.path, **resolved.kwargs())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _load_error(resolved, err) from None


def _evaluate(stage: EvaluateStage, model, tok, progress: bool, self_tokens) -> dict:  # noqa: ANN001
    from sparsefit.errors import UsageError
    from sparsefit.evaluation import tasks
    from sparsefit.evaluation.perplexity import perplexity

    out: dict = {"tasks": list(stage.tasks), "baseline": stage.baseline, "skipped": {}}
    device = next(model.parameters()).device
    for task in stage.tasks:
        try:
            if task == "self-ppl":
                ids = self_tokens()
                out["self_ppl"] = perplexity(model, ids.flatten().to(device), ids.shape[1], progress=progress).ppl
            elif task == "perplexity":
                r = tasks.run_task(task, model, tok, dataset=stage.dataset, seq_len=stage.seq_len,
                                   max_windows=stage.max_windows, progress=progress)  # fmt: skip
                out["ppl"], out["ppl_dataset"] = r["ppl"], stage.dataset
            else:  # the GSM8K tasks
                r = tasks.run_task(task, model, tok, limit=stage.limit, chat=stage.chat, progress=progress)
                if task == "gsm8k":
                    out["strict_match"], out["flexible_match"] = r["strict_match"], r["flexible_match"]
                else:
                    out["answer_ppl"] = r["ppl"]
        except UsageError as err:
            if stage.missing_data == "error":
                raise
            out["skipped"][task] = str(err)  # reported in the report, never dropped silently
            print(f"skipped {task}: {err}", flush=True)
    return out
