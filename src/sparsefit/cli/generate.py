"""`sparsefit generate`: text from a model through the sparse runtime (or the dense / transformers
yardsticks), streamed to stdout, with speed and memory in --json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsefit.cli.common import write_json
from sparsefit.config import add_flags, flag_values
from sparsefit.errors import UsageError

FIELDS = ["runtime", "values", "isa", "threads", "max_new_tokens", "ignore_eos", "temperature", "top_p", "top_k",
          "seed", "stop", "chat"]  # fmt: skip


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file '{path}' does not exist; pass a text file (one prompt a line) or JSONL")
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except ValueError:
                    raise UsageError(f'--prompt-file line {n} is not JSON; each JSONL row needs a "prompt"') from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise UsageError(f'--prompt-file line {n} has no string "prompt" field')
                prompts.append(row["prompt"])
            else:
                prompts.append(line)
    if not prompts:
        raise UsageError("give a prompt: --prompt TEXT or --prompt-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from sparsefit.config import validate
    from sparsefit.outputs import check_writable_file
    from sparsefit.runtime.config import GenerateOptions

    options = validate(GenerateOptions, flag_values(args, FIELDS), "generate options", as_flags=True)
    prompts = _prompts(args)
    check_writable_file(args.json, "--json", inputs=(args.model,))
    from sparsefit.runtime.generation import run_generate

    stream = sys.stdout if len(prompts) == 1 and not args.quiet else None
    result = run_generate(args.model, prompts, options, stream=stream)
    if stream is None and not args.quiet:
        for i, text in enumerate(result["texts"]):
            print(f"=== {i} ===\n{text}")
    elif stream is not None:
        print()
    s = result
    print(
        f"{s['runtime']} ({s['kernel']}, {s['values']}): prefill {s['prefill_tokens_per_s']:.1f} tok/s, decode "
        f"{s['decode_tokens_per_s']:.1f} tok/s, {s['weight_bytes'] / 2**20:.1f} MiB of weights, peak RSS "
        f"{s['peak_rss_bytes'] / 2**20:.0f} MiB",
        file=sys.stderr,
    )
    write_json(result, args.json)
    return 0


def register(sub: argparse._SubParsersAction, parents: list, only: str | None) -> None:
    """The `generate` command (its option flags come from `runtime.config.GenerateOptions`)."""
    p = sub.add_parser("generate", help="generate text, fast on sparse models (the sparse CPU runtime)",
                       parents=parents)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="builtin name, checkpoint dir or hub id")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", default=None, help='a text file (one prompt a line) or JSONL with "prompt"')
    p.add_argument("--json", default=None, help="write text, tokens, speeds, memory and the kernel used here")
    p.add_argument("--quiet", action="store_true", help="print no text (speeds only)")
    if only in (None, "generate"):
        from sparsefit.runtime.config import GenerateOptions

        add_flags(p, GenerateOptions, FIELDS)
    p.set_defaults(func=cmd_generate)
