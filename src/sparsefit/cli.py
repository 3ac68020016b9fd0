"""`sparsefit` command line: a thin argparse layer over the Python API."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from sparsefit import __version__
from sparsefit.config import add_flags, flag_values
from sparsefit.errors import SparsefitError, UsageError, first_line


class _Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line, as every other usage error does."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _quiet_libraries() -> None:
    # Library chatter (weight-loading bars, long-sequence tokenizer warnings) hides our own output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="builtin name, checkpoint dir, .gguf file or hub id")
    p.add_argument(
        "--dtype",
        default="float32",
        help="weights as loaded: float32 (default) | bfloat16 | float16 | auto (bfloat16 on a GPU that has it, "
        "else float32)",
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _write_json(data: dict, path: str | None) -> None:
    from sparsefit.atomic import write_json

    if path:
        write_json(path, data)
        print(f"wrote {path}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsefit.evaluation.recovery import load_baseline, recovery
    from sparsefit.evaluation.tasks import TASKS
    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.outputs import check_writable_file

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    if args.harness is None and args.task not in TASKS:
        raise UsageError(f"unknown task '{args.task}'; use one of: {', '.join(TASKS)} (or --harness TASK)")
    baseline = load_baseline(args.baseline) if args.baseline else None  # fail before loading a model
    check_writable_file(args.json, "--json", inputs=(args.model,))
    check_writable_file(args.samples, "--samples", inputs=(args.model,))
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.device, args.trust_remote_code)
    result = _run_eval_task(args, model, tokenizer)
    result["model"] = args.model
    if baseline is not None:
        result["recovery"] = recovery(result, baseline)
        result["baseline"] = args.baseline
    print(_summary(result))
    _write_json(result, args.json)
    return 0


def _run_eval_task(args: argparse.Namespace, model: object, tokenizer: object) -> dict:
    from sparsefit.evaluation import harness, tasks

    # Unset flags are left out so each function's own defaults apply (one source of defaults).
    def given(**kw: object) -> dict:
        return {k: v for k, v in kw.items() if v is not None}

    if args.harness is not None:
        names = [t for t in args.harness.split(",") if t]
        names = [n for t in names for n in (harness.ZERO_SHOT_SUITE if t == "zeroshot" else [t])]
        return harness.run_harness(
            model,
            tokenizer,
            names,
            **given(
                include_path=args.include_path,
                limit=args.limit,
                num_fewshot=args.num_fewshot,
                batch_size=args.batch_size,
                chat=args.chat,
            ),
        )
    samples = args.samples or (str(Path(args.json).with_suffix(".samples.jsonl")) if args.json else None)
    options = {
        "perplexity": dict(
            dataset=args.dataset,
            split=args.split,
            text_field=args.text_field,
            seq_len=args.seq_len,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
        ),
        "gsm8k-answer-ppl": dict(limit=args.limit, chat=args.chat, batch_size=args.batch_size),
        "gsm8k": dict(
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            chat=args.chat,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            samples_path=samples,
        ),
    }[args.task]
    result = tasks.run_task(args.task, model, tokenizer, **given(**options))
    if args.task == "gsm8k":
        result["samples_file"] = samples
    return result


def _summary(r: dict) -> str:
    if r["task"] == "perplexity":
        line = (
            f"{r['model']} on {r['dataset']}/{r['split']}: ppl {r['ppl']:.4f} (nll {r['nll']:.5f} over "
            f"{r['tokens']} tokens, {r['windows']} windows of {r['seq_len']}) in {r['seconds']:.1f} s"
        )
    elif r["task"] == "gsm8k":
        line = (
            f"{r['model']} GSM8K ({r['rows']} rows, {r['num_fewshot']}-shot{', chat' if r['chat'] else ''}): "
            f"strict {r['strict_match']:.4f} +/- {r['strict_match_stderr']:.4f}, flexible "
            f"{r['flexible_match']:.4f} +/- {r['flexible_match_stderr']:.4f}; {r['tokens_per_second']:.0f} tok/s"
        )
    elif r["task"] == "gsm8k-answer-ppl":
        line = f"{r['model']} GSM8K answer ppl {r['ppl']:.4f} ({r['rows']} rows, {r['answer_tokens']} answer tokens)"
    else:
        parts = [
            f"{task} {name} {value:.4f}"
            for task, metrics in r["results"].items()
            for name, value in metrics.items()
            if isinstance(value, float) and "stderr" not in name
        ]
        line = f"{r['model']} harness: " + "; ".join(parts)
    if "recovery" in r:
        line += "\nrecovery vs baseline: " + ", ".join(f"{k} {v:.4f}" for k, v in r["recovery"].items())
    return line


def _profile_arg(value: str | None) -> str | dict | None:
    """`uniform`, `owl`, or a .json/.yaml file mapping layer-name regexes to sparsities."""
    if value is None or value in ("uniform", "owl"):
        return value
    from sparsefit.config import load_yaml

    path = Path(value)
    if path.suffix not in (".json", ".yaml", ".yml") or not path.is_file():
        raise UsageError(f"--profile '{value}' is neither uniform, owl, nor an existing .json/.yaml mapping file")
    mapping = load_yaml(path, "--profile file")  # YAML is a superset of JSON
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"--profile file '{value}' must map layer-name regexes to sparsities, e.g. 'mlp': 0.6")
    return mapping


def _layerwise_setup(args: argparse.Namespace, config_cls: type, fields: list[str], extra: dict | None = None):  # noqa: ANN202
    """What `prune` and `quantize` share: the validated config (from the flags given), the compute
    device, the claimed output, and the model and tokenizer, loaded on the CPU (the layer-by-layer
    driver moves one block at a time to the compute device)."""
    from sparsefit.config import validate
    from sparsefit.models import load_model_and_tokenizer, parse_device
    from sparsefit.outputs import check_writable_file, claim_output

    options = {**flag_values(args, fields), **(extra or {})}  # unset flags keep the config's defaults
    if args.calib == "none":
        options["calib"] = None
    config = validate(config_cls, options, f"{args.command} options", as_flags=True)
    device = parse_device(args.device)
    check_writable_file(args.json, "--json", args.output, (args.model,))
    claim = claim_output(args.output, overwrite=args.overwrite, inputs=(args.model,))
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, "cpu", args.trust_remote_code)
    return config, device, claim, model, tokenizer


def cmd_prune(args: argparse.Namespace) -> int:
    from sparsefit.export import save_checkpoint
    from sparsefit.pruning import OneShotConfig, oneshot
    from sparsefit.pruning.oneshot import peak_rss_mb

    profile = {} if args.profile is None else {"profile": _profile_arg(args.profile)}
    config, device, claim, model, tokenizer = _layerwise_setup(args, OneShotConfig, PRUNE_FIELDS, profile)
    report = oneshot(model, tokenizer, config, device=device)
    report.model = args.model
    save_checkpoint(model, tokenizer, claim.path, {"pruning": report.to_json()})
    # `peak_rss_mb` is the pruning's; the save reads every weight back, so the process's peak may be later.
    report.process_peak_rss_mb = peak_rss_mb()
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items())
    profile = config.profile if isinstance(config.profile, str) else "explicit"
    print(
        f"pruned {args.model} with {config.method} ({report.structure}, {profile}): "
        f"sparsity {report.sparsity.overall:.4f} in {report.seconds:.1f} s ({phases}); "
        f"peak RSS {report.peak_rss_mb:.0f} MB -> {args.output}"
    )
    _write_json(report.to_json(), args.json)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from sparsefit.export.compressed import FORMATS, save_quantized
    from sparsefit.pruning.oneshot import peak_rss_mb
    from sparsefit.quantization import QuantizeConfig, quantize

    config, device, claim, model, tokenizer = _layerwise_setup(args, QuantizeConfig, QUANTIZE_FIELDS)
    result = quantize(model, tokenizer, config, device=device)
    result.report.model = args.model
    info = save_quantized(model, tokenizer, claim.path, result)
    result.report.process_peak_rss_mb = peak_rss_mb()
    r = result.report
    print(
        f"quantized {args.model} to {config.scheme} with {config.method} in {r.seconds:.1f} s: {r.layers} layers, "
        f"sparsity {r.sparsity_before:.4f} -> {r.sparsity_after:.4f}, {r.revived_weights} pruned weights revived; "
        f"{FORMATS[config.scheme]}, {info['weight_bytes'] / 2**20:.1f} MiB of weights "
        f"({info['ratio_to_dense_bf16']:.2f}x dense bf16) -> {args.output}"
    )
    _write_json({**r.to_json(), "export": info}, args.json)
    return 0


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [math.nan]
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} takes comma-separated finite numbers, e.g. 0.3,0.5,0.7 (got '{text}')")
    return values


def finetune_options(args: argparse.Namespace) -> dict:
    """The finetune flags the user set, as FinetuneConfig fields (unset flags keep the config's defaults)."""
    options = flag_values(args, [name for names in FINETUNE_GROUPS.values() for name in names])
    ast = flag_values(args, AST_FIELDS)
    if ast:
        if options.get("method") != "ast":
            flags = ", ".join("--" + name.replace("_", "-") for name in ast)
            raise UsageError(f"{flags} set options of adaptive sparse training: add --method ast")
        options["ast"] = ast
    adapter = flag_values(args, ADAPTER_FIELDS)
    if adapter:
        if options.get("peft", "none") == "none":
            flags = ", ".join("--" + name.replace("_", "-") for name in adapter)
            raise UsageError(f"{flags} set options of parameter-efficient fine-tuning: add --peft rows or --peft lora")
        options["adapter"] = adapter
    if args.gmp is not None:
        values = _float_list(args.gmp, "--gmp")
        if len(values) != 5:
            raise UsageError(f"--gmp takes INITIAL,FINAL,START,END,EVERY, e.g. 0,0.5,0,100,10 (got '{args.gmp}')")
        initial, final, start, end, every = values
        options["gmp"] = {"initial": initial, "final": final, "start": int(start), "end": int(end), "every": int(every)}
    return options


def cmd_finetune(args: argparse.Namespace) -> int:
    from sparsefit.config import validate
    from sparsefit.models import load_model_and_tokenizer, parse_device
    from sparsefit.models.offload import reuse_freed_memory
    from sparsefit.outputs import check_writable_file, claim_output
    from sparsefit.training import FinetuneConfig, finetune, iterative_prune_finetune
    from sparsefit.training.loop import fingerprint_changes, finished_run, options_fingerprint

    config = validate(
        FinetuneConfig, finetune_options(args), "finetune options", as_flags=True, flattened=("ast", "adapter")
    )
    device = parse_device(args.device)
    check_writable_file(args.json, "--json", args.output, (args.model, args.teacher))
    cycles = _float_list(args.cycles, "--cycles") if args.cycles else None
    if cycles and not all(0 < c < 1 for c in cycles):
        raise UsageError(f"--cycles takes sparsities in (0, 1), e.g. 0.3,0.5,0.7 (got '{args.cycles}')")
    if args.resume and cycles:
        raise UsageError("--resume continues one fine-tune; iterative --cycles start over (drop --resume)")
    # Checked and locked before the model loads: a second run into the same place fails at once.
    claim = claim_output(args.output, overwrite=args.overwrite, reuse=args.resume, inputs=(args.model, args.teacher))
    done = finished_run(claim.path) if args.resume else None
    if done is not None:
        options = options_fingerprint(args.model, config, int(os.environ.get("WORLD_SIZE", "1")))
        changes = fingerprint_changes({k: done.get("fingerprint", {}).get(k) for k in options}, options)
        if changes:
            raise UsageError(
                f"{args.output} holds a fine-tune that finished with other options ({', '.join(changes)}); "
                "pass --overwrite to train again with these"
            )
        print(f"{args.output} already holds a finished fine-tune ({done['steps']} steps); nothing to resume")
        return 0
    reuse_freed_memory()
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, device, args.trust_remote_code)
    if args.cycles:
        from sparsefit.pruning import OneShotConfig

        prune = validate(
            OneShotConfig,
            {k: v for k, v in {"method": args.cycle_method, "calib": args.calib}.items() if v is not None},
            "prune options",
        )
        records = iterative_prune_finetune(
            model, tokenizer, cycles, prune, config, claim.path, device=device, overwrite=args.overwrite
        )
        for c in records:
            f = c["finetune"]
            print(f"cycle {c['sparsity']:.2f}: final loss {f['final_loss']:.4f}, sparsity {f['sparsity']:.4f}")
        _write_json({"cycles": records}, args.json)
        return 0
    metrics = finetune(
        model, tokenizer, config, claim.path, resume=args.resume, device=device, overwrite=args.overwrite
    )
    tps = metrics["tokens_per_second"]
    print(
        f"fine-tuned {args.model}: {metrics['steps']} steps, {metrics['tokens']} tokens"
        f"{f' at {tps:.0f} tok/s' if tps else ''}, final loss {metrics['final_loss']:.4f}, sparsity "
        f"{metrics['sparsity']:.4f}, revived weights {metrics['revived_weights']} -> {args.output}"
    )
    _write_json(metrics, args.json)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sparsefit.models.offload import reuse_freed_memory
    from sparsefit.recipes import load_recipe, run_recipe
    from sparsefit.recipes.report import format_table

    recipe = load_recipe(args.recipe, args.set or [], args.model)
    if args.check:
        print(f"recipe {recipe.name}: {len(recipe.stages)} stages on {recipe.model}")
        for i, stage in enumerate(recipe.stages):
            fields = stage.model_dump(exclude_defaults=True, exclude={"kind", "name"})
            print(f"  {i + 1:02d}-{stage.name} ({stage.kind}) {fields}")
        for note in recipe.notes:
            print(f"  note: {note}")
        return 0
    output = args.output or str(Path("runs") / recipe.name)  # the name is a plain folder name (validated)
    if any(stage.kind == "finetune" for stage in recipe.stages):
        reuse_freed_memory()
    report = run_recipe(recipe, output, args.device)
    print(format_table(report["stages"], markdown=False))
    print(f"report: {Path(output) / 'report.md'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sparsefit.export import export_checkpoint
    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.outputs import check_writable_file, claim_output

    check_writable_file(args.json, "--json", args.output, (args.model,))
    claim = claim_output(args.output, overwrite=args.overwrite, inputs=(args.model,))
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, "cpu", args.trust_remote_code)
    info = export_checkpoint(model, tokenizer, claim.path, args.model, args.format, args.slorb, args.row_adapters)
    print(
        f"exported {args.model} as {info['format']}: {len(info['files'])} files, {info['bytes'] / 2**20:.1f} MiB, "
        f"sparsity {info['sparsity']:.4f} -> {args.output}"
    )
    if info.get("slorb") in ("dropped", "merged"):
        what = (
            "left out: the export is the N:M model alone"
            if info["slorb"] == "dropped"
            else ("merged into the weights: the export is one plain checkpoint, no longer N:M")
        )
        print(f"notice: the model's SLoRB branches were {what}", file=sys.stderr)
    _write_json(info, args.json)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sparsefit.recipes import read_report
    from sparsefit.recipes.report import format_table

    report = read_report(args.run_dir)
    print(format_table(report["stages"], markdown=False))
    if report["baseline"]:
        print(f"recovery = metric / baseline '{report['baseline']['stage']}' (perplexities: above 1 is worse)")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from sparsefit.recipes import builtin_recipes, load_recipe

    for name in sorted(builtin_recipes()):
        recipe = load_recipe(name)
        kinds = " -> ".join(s.kind for s in recipe.stages)
        print(f"{name:14s} {recipe.description.split('.')[0]}.\n{'':14s} [{kinds}]")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sparsefit.models import BUILTIN_MODELS, cache_root

    for spec in BUILTIN_MODELS.values():
        cached = (cache_root() / "models" / spec.name / "config.json").exists()
        print(f"{spec.name:16s} {spec.description} [{'cached' if cached else 'fetched from PyPI on first use'}]")
    return 0


# The config fields that are flags, in --help order (each flag's type, default and help come from its field).
PRUNE_FIELDS = [
    "preset", "method", "sparsity", "structure", "owl_m", "owl_lambda", "targets", "ignore", "calib", "calib_split",
    "text_field", "num_samples", "self_mix", "seq_len", "seed", "batch_size", "block_size", "damp", "magnitude_scope",
    "preserve_mask", "reconstruct_iters", "sequential", "compute_dtype", "offload_dir",
]  # fmt: skip
QUANTIZE_FIELDS = [
    "scheme", "method", "group_size", "export_dtype", "sparse_format", "targets", "ignore", "calib", "calib_split",
    "text_field", "num_samples", "self_mix", "seq_len", "seed", "batch_size", "block_size", "damp", "sequential",
    "compute_dtype",
]  # fmt: skip
FINETUNE_GROUPS = {
    "data": ["dataset", "self_samples", "self_mix", "split", "format", "text_field", "seq_len", "limit"],
    "length (one of)": ["max_steps", "num_epochs", "max_tokens"],
    "optimization": [
        "batch_size",
        "grad_accum",
        "lr",
        "weight_decay",
        "warmup_steps",
        "scheduler",
        "max_grad_norm",
        "bf16",
        "gradient_checkpointing",
        "strategy",
        "seed",
    ],  # fmt: skip
    "checkpoints": ["checkpoint_every", "checkpoint_minutes", "keep_checkpoints"],
    "sparsity": ["method", "masks", "targets", "ignore", "peft"],
    "distillation": [
        "teacher",
        "ce_weight",
        "kl_weight",
        "square_head_weight",
        "temperature",
        "distill_layers",
        "teacher_dtype",
    ],  # fmt: skip
}

AST_FIELDS = [
    "structure", "mask_every", "mask_metric", "stats_batches", "stats_every", "srste_decay", "increase_steps",
    "pruned_start", "pruned_cap", "slorb", "slorb_k", "slorb_init", "slorb_trainable_projection",
]  # fmt: skip

ADAPTER_FIELDS = [
    "rank", "row_fraction", "row_budget", "criterion", "importance_batches", "zo_directions", "zo_eps", "dropout",
    "lora_alpha", "exclude", "base_bits", "base_group_size", "row_init", "merge",
]  # fmt: skip

OVERWRITE_HELP = "replace an earlier sparsefit output in OUTPUT (other directories are never replaced)"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the flags derived from config classes are added for that
    command alone (those classes come with torch, which `sparsefit --help` need not load)."""
    parser = _Parser(prog="sparsefit", description="Prune, recover and export sparse causal language models.")
    parser.add_argument("--version", action="version", version=f"sparsefit {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full trace of an unexpected error")
    # --debug is also accepted after the command; SUPPRESS keeps the command's parser from resetting it
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's own keyword
        return sub.add_parser(name, help=help, parents=[common])

    p = command("eval", help="evaluate a model: perplexity, GSM8K, lm-evaluation-harness tasks")
    _add_model_args(p)
    p.add_argument("--task", default="perplexity", help="perplexity (default) | gsm8k | gsm8k-answer-ppl")
    p.add_argument("--harness", default=None, help="lm-eval task names, comma-separated ('zeroshot' = the AST suite)")
    p.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (gsm8k default 0)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation bound for gsm8k (default 256)")
    p.add_argument("--samples", default=None, help="per-sample JSONL for gsm8k (default: beside --json)")
    p.add_argument("--baseline", default=None, help="result JSON of the dense model: report recovery against it")
    # Unset (None) flags leave the evaluation functions' own defaults in force.
    p.add_argument("--dataset", default=None, help="wikitext2 (default) | gsm8k | file.txt | file.jsonl | hub id")
    p.add_argument("--split", default=None, help="default test")
    p.add_argument("--text-field", default=None, help="field of .jsonl / hub rows holding the text (default text)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per perplexity window (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per forward (default 1; gsm8k: decoding slots, 32; answer ppl 8)",
    )
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_eval)

    p = command("prune", help="one-shot pruning (magnitude, wanda, sparsegpt)")
    _add_model_args(p)
    if only in (None, "prune"):
        from sparsefit.pruning import OneShotConfig

        add_flags(p, OneShotConfig, PRUNE_FIELDS[:4])
        p.add_argument("--profile", default=None, help=OneShotConfig.model_fields["profile"].description)
        add_flags(p, OneShotConfig, PRUNE_FIELDS[4:])
    p.add_argument("--output", required=True, help="directory for the pruned HF checkpoint")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.set_defaults(func=cmd_prune)

    p = command("quantize", help="quantize (GPTQ or round-to-nearest), pruned weights kept zero; compressed export")
    _add_model_args(p)
    if only in (None, "quantize"):
        from sparsefit.quantization.config import QuantizeConfig

        add_flags(p, QuantizeConfig, QUANTIZE_FIELDS)
    p.add_argument("--output", required=True, help="directory for the compressed-tensors checkpoint")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", default=None, help="write the report (with the export's files and sizes) as JSON here")
    p.set_defaults(func=cmd_quantize)

    p = command("finetune", help="fine-tune (dense or sparse, optionally distilled from a teacher)")
    _add_model_args(p)
    p.add_argument("--output", required=True, help="directory for the checkpoint, train_log.jsonl and metrics.json")
    p.add_argument("--json", default=None, help="also write the final metrics here")
    p.add_argument("--resume", action="store_true", help="continue from the newest whole checkpoint in OUTPUT")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    for title, names in FINETUNE_GROUPS.items() if only in (None, "finetune") else ():
        from sparsefit.training import FinetuneConfig

        g = p.add_argument_group(title)
        add_flags(g, FinetuneConfig, names)
        if title == "sparsity":
            g.add_argument("--gmp", default=None, help="gradual magnitude pruning INITIAL,FINAL,START,END,EVERY")
            g.add_argument("--cycles", default=None, help="iterative prune/fine-tune cycles, e.g. 0.3,0.5,0.7")
            g.add_argument("--cycle-method", default=None, help="one-shot method of each cycle (default sparsegpt)")
            g.add_argument("--calib", default=None, help="calibration of each cycle (default gsm8k)")
    if only in (None, "finetune"):
        from sparsefit.training.config import AdapterConfig, ASTConfig

        add_flags(p.add_argument_group("adaptive sparse training (--method ast)"), ASTConfig, AST_FIELDS)
        add_flags(p.add_argument_group("adapters (--peft rows | lora)"), AdapterConfig, ADAPTER_FIELDS)
    p.set_defaults(func=cmd_finetune)

    p = command("run", help="run a recipe (builtin name or YAML, native or SparseML) into a run directory")
    p.add_argument("recipe", help="builtin recipe name (see `sparsefit recipes`) or a YAML file")
    p.add_argument("--output", default=None, help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="variable or STAGE.FIELD override")
    p.add_argument("--model", default=None, help="replace the recipe's model")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    p.add_argument("--check", action="store_true", help="validate and print the stages, run nothing")
    p.set_defaults(func=cmd_run)

    p = command("export", help="write a model as a plain HF checkpoint (or compact sparse storage) with sparsity.json")
    _add_model_args(p)
    p.add_argument(
        "--format",
        default="hf",
        help="hf (default): a plain Hugging Face checkpoint | sparse-bitmask | sparse-24-bitmask: compact "
        "sparse storage in the layouts of compressed-tensors <= 0.14 (sparsefit reads them back)",
    )
    p.add_argument(
        "--slorb",
        default="keep",
        choices=["keep", "drop", "merge"],
        help="a model trained with SLoRB branches: keep them beside the weights (default; sparsefit restores "
        "them) | drop them (the N:M model alone) | merge them into dense weights (one plain checkpoint)",
    )
    p.add_argument(
        "--row-adapters",
        default="keep",
        choices=["keep", "merge"],
        help="a model with unmerged row adapters (finetune --merge none): keep them beside the weights (default) "
        "| merge them into the weights (the sparsity is kept)",
    )
    p.add_argument("--output", required=True, help="directory for the exported checkpoint")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", default=None, help="write what was exported (files, bytes, sparsity) here")
    p.set_defaults(func=cmd_export)

    p = command("report", help="print the report table of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = command("recipes", help="list builtin recipes")
    p.set_defaults(func=cmd_recipes)

    p = command("models", help="list builtin models")
    p.set_defaults(func=cmd_models)
    return parser


def _one_line(err: BaseException) -> tuple[str, int]:
    """The message and exit code of an error that is not sparsefit's own."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return f"no space left on the device{where}; free some space and rerun (a fine-tune: with --resume)", 1
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename or first_line(err)}; pass a path you may read and write", 2
    if isinstance(err, MemoryError):
        return "out of memory; lower --batch-size or --seq-len, or use a smaller model", 1
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"unexpected {type(err).__name__}{where}: {first_line(err)} (rerun with --debug for the full trace)", 1


def _error(message: str) -> None:
    """Print the one error line on a line of its own: progress bars the error cut short end first."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"sparsefit: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("SPARSEFIT_DEBUG") == "1"
    try:
        args = build_parser(only=next((a for a in argv if not a.startswith("-")), "")).parse_args(argv)
        _quiet_libraries()
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except SparsefitError as err:
        _error(first_line(err, 1000))
        return err.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, never a stack trace
        if debug:
            traceback.print_exc()
        message, code = _one_line(err)
        _error(message)
        return code


if __name__ == "__main__":
    sys.exit(main())
