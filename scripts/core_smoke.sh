#!/usr/bin/env bash
# A core install works: sparsefit installed (not editable) into a fresh .venv-core WITHOUT extras,
# then, from outside the checkout, the builtin model loads, `prune` writes a sparse model, the
# sparse kernels build from the installed sources and `generate` runs on them, and a command that
# needs an extra exits 2 naming it ("install sparsefit[export]"). CI runs this after the suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-core"
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
$py -m pip install --quiet --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    $py -m pip install --quiet "torch==2.13.0"
fi
$py -m pip install --quiet "$root"
$py -m pip check
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export SPARSEFIT_CACHE="$work/cache"  # kernels built afresh from the installed package's sources
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
sf="$venv/bin/sparsefit"
fail() { echo "core install: $*" >&2; exit 1; }

$py - <<'PY'
import importlib.util, sys
extras = ["datasets", "lm_eval", "peft", "matplotlib", "compressed_tensors", "fastapi", "uvicorn", "torchao"]
present = [m for m in extras if importlib.util.find_spec(m) is not None]
assert not present, f"a core install should not have {present}"
import sparsefit
assert "site-packages" in sparsefit.__file__, f"sparsefit imported from {sparsefit.__file__}, not the install"
PY
$sf --version
kernels="$($py -m sparsefit.runtime)"
echo "$kernels"
case "$kernels" in "sparse kernels: avx"*) ;; *) fail "the kernels did not build from the installed sources";; esac

models_cache="${HOME}/.cache/sparsefit/models"  # reuse the builtin model the suite already fetched
[ -d "$models_cache" ] && mkdir -p cache && ln -s "$models_cache" cache/models
$sf prune --model smollm2-135m --method magnitude --sparsity 0.5 --output pruned
$py - <<'PY'
import json
report = json.load(open("pruned/sparsity.json"))
overall = report["sparsity"]["overall"]
assert abs(overall - 0.5) < 0.01, f"pruned to {overall}, not 0.5"
print(f"core install: pruned, overall sparsity {overall:.4f}")
PY
out="$($sf generate --model pruned --prompt "The capital of France is" --max-new-tokens 8)"
[ -n "$out" ] || fail "generate printed nothing"
echo "core install: generate printed: ${out:0:80}"

expect_extra() {  # expect_extra EXTRA CMD...: exit 2 and one line naming sparsefit[EXTRA]
    local extra="$1"; shift
    set +e; err="$("$@" 2>&1 >/dev/null)"; code=$?; set -e
    [ "$code" -eq 2 ] || fail "'$*' exited $code, expected 2: $err"
    grep -q "sparsefit\[$extra\]" <<<"$err" || fail "'$*' did not name sparsefit[$extra]: $err"
    grep -q "unexpected" <<<"$err" && fail "'$*' ended in an unexpected error: $err"
    echo "core install: sparsefit $2 names sparsefit[$extra]"
}
expect_extra export "$sf" quantize --model pruned --output q --method rtn
expect_extra serve "$sf" serve --model pruned
echo "core install: ok"
