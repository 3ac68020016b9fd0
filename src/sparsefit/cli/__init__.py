"""The `sparsefit` command line (`sparsefit.cli.main`)."""

from sparsefit.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
