"""What the command modules share: the model flags, the --json writer, number-list parsing."""

from __future__ import annotations

import argparse
import math
import sys

from sparsefit.errors import UsageError

OVERWRITE_HELP = "replace an earlier sparsefit output in OUTPUT (other directories are never replaced)"


class Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line, as every other usage error does."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see: {self.prog} --help)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="builtin name, checkpoint dir, .gguf file or hub id")
    p.add_argument(
        "--dtype",
        default="float32",
        help="weights as loaded: float32 (default) | bfloat16 | float16 | auto (bfloat16 on a GPU that has it, "
        "else float32)",
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def write_json(data: dict, path: str | None) -> None:
    from sparsefit.atomic import write_json as write

    if path:
        write(path, data)
        print(f"wrote {path}", file=sys.stderr)


def float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [math.nan]
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} takes comma-separated finite numbers, e.g. 0.3,0.5,0.7 (got '{text}')")
    return values
