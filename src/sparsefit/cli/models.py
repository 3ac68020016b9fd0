"""`sparsefit models`: the builtin models and whether they are cached."""

from __future__ import annotations

import argparse


def cmd_models(args: argparse.Namespace) -> int:
    from sparsefit.cache import cache_root
    from sparsefit.models import BUILTIN_MODELS

    for spec in BUILTIN_MODELS.values():
        cached = (cache_root() / "models" / spec.name / "config.json").exists()
        print(f"{spec.name:16s} {spec.description} [{'cached' if cached else 'fetched from PyPI on first use'}]")
    return 0


def register(sub: argparse._SubParsersAction, parents: list, only: str | None) -> None:
    """The `models` command."""
    p = sub.add_parser("models", help="list builtin models", parents=parents)
    p.set_defaults(func=cmd_models)
