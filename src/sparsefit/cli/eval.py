"""`sparsefit eval`: perplexity, GSM8K and lm-evaluation-harness tasks on a loaded model."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsefit.cli.common import add_model_args, write_json
from sparsefit.errors import UsageError


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
    write_json(result, args.json)
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
            runtime=args.runtime,
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


def register(sub: argparse._SubParsersAction, parents: list, only: str | None) -> None:
    """The `eval` command and its flags."""
    p = sub.add_parser("eval", help="evaluate a model: perplexity, GSM8K, lm-evaluation-harness tasks", parents=parents)
    add_model_args(p)
    p.add_argument("--task", default="perplexity", help="perplexity (default) | gsm8k | gsm8k-answer-ppl")
    p.add_argument("--harness", default=None, help="lm-eval task names, comma-separated ('zeroshot' = the AST suite)")
    p.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (gsm8k default 0)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation bound for gsm8k (default 256)")
    p.add_argument("--samples", default=None, help="per-sample JSONL for gsm8k (default: beside --json)")
    p.add_argument(
        "--runtime",
        default=None,
        choices=["auto", "sparse", "hf"],
        help="gsm8k generation: sparse (the packed kernels, bf16 weights) | hf (transformers in the loaded "
        "dtype) | auto (default: sparse where the model's family has the fast decoder)",
    )
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
