"""`sparsefit serve`: an OpenAI-compatible server (completions, chat, models, health, metrics) on
the sparse CPU runtime, loopback by default."""

from __future__ import annotations

import argparse
import logging
import sys

from sparsefit.config import add_flags, flag_values
from sparsefit.errors import UsageError

FIELDS = ["host", "port", "api_key", "model_name", "max_batch", "max_model_len", "max_queue", "prefill_chunk",
          "shutdown_timeout", "runtime", "values", "isa", "threads"]  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from sparsefit.config import validate
    from sparsefit.runtime.config import ServeOptions

    options = validate(ServeOptions, flag_values(args, FIELDS), "serve options", as_flags=True)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UsageError(f"sparsefit serve needs {err.name}: pip install 'sparsefit[serve]'") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from sparsefit.runtime.serve.server import run_server

    run_server(args.model, options)
    return 0


def register(sub: argparse._SubParsersAction, parents: list, only: str | None) -> None:
    """The `serve` command (its option flags come from `runtime.config.ServeOptions`)."""
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (the sparse CPU runtime)",
                       parents=parents)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="builtin name, checkpoint dir or hub id")
    if only in (None, "serve"):
        from sparsefit.runtime.config import ServeOptions

        add_flags(p, ServeOptions, FIELDS)
    p.set_defaults(func=cmd_serve)
