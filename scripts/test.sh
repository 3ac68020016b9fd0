#!/usr/bin/env bash
# The test suite: ruff, then every test (fast unit tests and the `slow` ones on the embedded model).
# Extra arguments go to pytest, e.g. `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARSEFIT_DATA_DIR="${SPARSEFIT_DATA_DIR:-$(cd .. && pwd)/shared/data}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
