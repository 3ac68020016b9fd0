"""`sparsefit` command line: a thin argparse layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sparsefit import __version__
from sparsefit.errors import SparsefitError, UsageError


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
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (default float32)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _write_json(data: dict, path: str | None) -> None:
    from sparsefit.atomic import write_json

    if path:
        write_json(path, data)
        print(f"wrote {path}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsefit.evaluation.recovery import load_baseline, recovery
    from sparsefit.models import load_model_and_tokenizer

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    tasks = ("perplexity", "gsm8k", "gsm8k-answer-ppl")
    if args.harness is None and args.task not in tasks:
        raise UsageError(f"unknown task '{args.task}'; use one of: {', '.join(tasks)} (or --harness TASK)")
    baseline = load_baseline(args.baseline) if args.baseline else None  # fail before loading a model
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
    from sparsefit.evaluation import gsm8k, harness, tasks

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
    if args.task == "gsm8k":
        samples = args.samples or (str(Path(args.json).with_suffix(".samples.jsonl")) if args.json else None)
        result = gsm8k.evaluate_gsm8k(
            model,
            tokenizer,
            **given(
                limit=args.limit,
                num_fewshot=args.num_fewshot,
                chat=args.chat,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                samples_path=samples,
            ),
        )
        result["samples_file"] = samples
        return result
    if args.task == "gsm8k-answer-ppl":
        return gsm8k.evaluate_answer_ppl(
            model, tokenizer, **given(limit=args.limit, chat=args.chat, batch_size=args.batch_size)
        )
    return tasks.evaluate_perplexity(
        model,
        tokenizer,
        **given(
            dataset=args.dataset,
            split=args.split,
            text_field=args.text_field,
            seq_len=args.seq_len,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
        ),
    )


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
    path = Path(value)
    if path.suffix not in (".json", ".yaml", ".yml") or not path.is_file():
        raise UsageError(f"--profile '{value}' is neither uniform, owl, nor an existing .json/.yaml mapping file")
    import yaml

    try:
        mapping = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise UsageError(f"--profile file '{value}' does not parse: {str(err).splitlines()[0]}") from None
    if not isinstance(mapping, dict):
        raise UsageError(f"--profile file '{value}' must map layer-name regexes to sparsities")
    return mapping


def cmd_prune(args: argparse.Namespace) -> int:
    from sparsefit.config import validate
    from sparsefit.export import save_checkpoint
    from sparsefit.models import load_model_and_tokenizer, parse_device
    from sparsefit.pruning import OneShotConfig, oneshot

    options = {
        "method": args.method,
        "sparsity": args.sparsity,
        "structure": args.structure,
        "profile": _profile_arg(args.profile),
        "owl_m": args.owl_m,
        "owl_lambda": args.owl_lambda,
        "targets": args.targets,
        "ignore": args.ignore or [],
        "calib": args.calib,
        "calib_split": args.calib_split,
        "text_field": args.text_field,
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "damp": args.damp,
        "preserve_mask": args.preserve_mask,
        "compute_dtype": args.compute_dtype,
    }
    options = {k: v for k, v in options.items() if v is not None}  # unset flags keep the config's defaults
    if args.calib == "none":
        options["calib"] = None
    config = validate(OneShotConfig, options, "prune options")
    device = parse_device(args.device)
    # Load on the CPU: the driver moves one block at a time to the compute device.
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, "cpu", args.trust_remote_code)
    report = oneshot(model, tokenizer, config, device=device)
    report["model"] = args.model
    save_checkpoint(model, tokenizer, args.output, {"pruning": report})
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report["phases"].items())
    profile = config.profile if isinstance(config.profile, str) else "explicit"
    print(
        f"pruned {args.model} with {config.method} ({report['structure']}, {profile}): "
        f"sparsity {report['sparsity']['overall']:.4f} in {report['seconds']:.1f} s ({phases}); "
        f"peak RSS {report['peak_rss_mb']:.0f} MB -> {args.output}"
    )
    _write_json(report, args.json)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sparsefit.models import BUILTIN_MODELS, cache_root

    for spec in BUILTIN_MODELS.values():
        cached = (cache_root() / "models" / spec.name / "config.json").exists()
        print(f"{spec.name:16s} {spec.description} [{'cached' if cached else 'fetched from PyPI on first use'}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsefit", description="Prune, recover and export sparse causal language models.")
    parser.add_argument("--version", action="version", version=f"sparsefit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("eval", help="evaluate a model: perplexity, GSM8K, lm-evaluation-harness tasks")
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
    p.add_argument("--dataset", default="wikitext2", help="wikitext2 | gsm8k | file.txt | file.jsonl | hub id")
    p.add_argument("--split", default="test")
    p.add_argument("--text-field", default="text", help="field of .jsonl / hub rows holding the text")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default 1; gsm8k 16)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="one-shot pruning (magnitude, wanda, sparsegpt)")
    _add_model_args(p)
    p.add_argument("--method", default=None, help="magnitude | wanda | sparsegpt (default sparsegpt)")
    p.add_argument("--sparsity", type=float, default=None, help="target fraction of zeros, in [0, 1) (default 0.5)")
    p.add_argument("--structure", default=None, help="unstructured (default) or N:M, e.g. 2:4")
    p.add_argument(
        "--profile", default=None, help="uniform (default) | owl | file.yaml mapping layer regexes to sparsities"
    )
    p.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold M (default 5)")
    p.add_argument("--owl-lambda", type=float, default=None, help="OWL sparsity spread lambda (default 0.08)")
    p.add_argument(
        "--targets", nargs="+", default=None, help="regexes of layer names to prune (default: all block linears)"
    )
    p.add_argument("--ignore", nargs="+", default=None, help="regexes of layer names to leave dense")
    p.add_argument("--calib", default=None, help="calibration: gsm8k (default) | wikitext2 | file | self | none")
    p.add_argument("--calib-split", default=None, help="split of the calibration dataset (default train)")
    p.add_argument("--text-field", default=None)
    p.add_argument("--num-samples", type=int, default=None, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="calibration sequences per forward (default 4)")
    p.add_argument("--block-size", type=int, default=None, help="SparseGPT column block (default 128)")
    p.add_argument("--damp", type=float, default=None, help="SparseGPT dampening (default 0.01)")
    p.add_argument("--preserve-mask", action="store_true", default=None, help="keep existing zeros pruned")
    p.add_argument("--compute-dtype", default=None, help="auto | float32 | bfloat16: block forwards (default auto)")
    p.add_argument("--output", required=True, help="directory for the pruned HF checkpoint")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("models", help="list builtin models")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except SparsefitError as err:
        print(f"sparsefit: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("sparsefit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
