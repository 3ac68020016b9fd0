"""`sparsefit` command line: a thin argparse layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

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


def _print_json(data: dict, path: str | None) -> None:
    from sparsefit.atomic import write_json

    if path:
        write_json(path, data)
        print(f"wrote {path}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsefit.evaluation.tasks import evaluate_perplexity
    from sparsefit.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.device, args.trust_remote_code)
    result = evaluate_perplexity(
        model, tokenizer, args.dataset, args.split, args.text_field, args.seq_len, args.max_windows, args.batch_size
    )
    result["model"] = args.model
    print(
        f"{args.model} on {args.dataset}/{args.split}: ppl {result['ppl']:.4f} "
        f"(nll {result['nll']:.5f} over {result['tokens']} tokens, {result['windows']} windows of "
        f"{result['seq_len']}) in {result['seconds']:.1f} s"
    )
    _print_json(result, args.json)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from sparsefit.config import validate
    from sparsefit.export import save_checkpoint
    from sparsefit.models import load_model_and_tokenizer, parse_device
    from sparsefit.pruning import OneShotConfig, oneshot

    options = {
        "method": args.method,
        "sparsity": args.sparsity,
        "structure": args.structure,
        "profile": args.profile,
        "owl_m": args.owl_m,
        "owl_lambda": args.owl_lambda,
        "targets": args.targets,
        "ignore": args.ignore or [],
        "calib": None if args.calib == "none" else args.calib,
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
    config = validate(OneShotConfig, {k: v for k, v in options.items() if v is not None}, "prune options")
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
    _print_json(report, args.json)
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

    p = sub.add_parser("eval", help="evaluate a model (perplexity)")
    _add_model_args(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2 | gsm8k | file.txt | file.jsonl | hub id")
    p.add_argument("--split", default="test")
    p.add_argument("--text-field", default="text", help="field of .jsonl / hub rows holding the text")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="one-shot pruning (magnitude, wanda, sparsegpt)")
    _add_model_args(p)
    p.add_argument("--method", default="sparsegpt", help="magnitude | wanda | sparsegpt (default sparsegpt)")
    p.add_argument("--sparsity", type=float, default=None, help="target fraction of zeros, in [0, 1) (default 0.5)")
    p.add_argument("--structure", default=None, help="unstructured (default) or N:M, e.g. 2:4")
    p.add_argument("--profile", default=None, help="uniform (default) | owl")
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
    p.add_argument("--batch-size", type=int, default=None, help="calibration sequences per forward (default 8)")
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
