#!/usr/bin/env bash
# The test suite: ruff, then every test (fast unit tests and the `slow` ones on the embedded model).
# Extra arguments go to pytest, e.g. `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The slow tests need the datasets: SPARSEFIT_DATA_DIR, else ../shared/data where a checkout sits beside
# one, else sparsefit's default data folder (~/.cache/sparsefit/data).
if [ -z "${SPARSEFIT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
    export SPARSEFIT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
