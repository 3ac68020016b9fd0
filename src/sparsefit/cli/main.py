"""`sparsefit` command line: a thin argparse layer over the Python API, one module per command group.

Each command module has a `register(sub, parents, only)` that adds its subcommands; `only` names
the command being run, so the flags derived from config classes (which import torch) are built
for that command alone and `sparsefit --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from sparsefit import __version__
from sparsefit.cli import eval as eval_cmd
from sparsefit.cli import export, finetune, generate, models, prune, run, serve
from sparsefit.cli.common import Parser
from sparsefit.errors import SparsefitError, first_line, missing_package

COMMAND_MODULES = (eval_cmd, prune, finetune, run, export, generate, serve, models)


def _quiet_libraries() -> None:
    # Library chatter (weight-loading bars, long-sequence tokenizer warnings) hides our own output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the flags derived from config classes are added for that
    command alone (those classes come with torch, which `sparsefit --help` need not load)."""
    parser = Parser(prog="sparsefit", description="Prune, recover and export sparse causal language models.")
    parser.add_argument("--version", action="version", version=f"sparsefit {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full trace of an unexpected error")
    # --debug is also accepted after the command; SUPPRESS keeps the command's parser from resetting it
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMAND_MODULES:
        module.register(sub, [common], only)
    return parser


def _one_line(err: BaseException) -> tuple[str, int]:
    """The message and exit code of an error that is not sparsefit's own."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return f"no space left on the device{where}; free some space and rerun (a fine-tune: with --resume)", 1
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename or first_line(err)}; pass a path you may read and write", 2
    missing = missing_package(err)
    if missing is not None:
        return missing, 2
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
