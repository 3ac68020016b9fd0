"""A core install (no extras) works: in a child process where every optional package of
pyproject's extras cannot be imported, `import sparsefit`, loading a model and `prune` run, and a
command that needs an extra says which one in one line (exit 2), never "unexpected"."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from sparsefit.errors import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
# Each listed module set to None in sys.modules: `import x` then raises ModuleNotFoundError and
# importlib.util.find_spec("x") returns None, as when the package is not installed.
BLOCK = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None
from sparsefit.cli import main
results = []
for argv in {commands!r}:
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    results.append(code)
print("RESULTS " + json.dumps(results))
"""


def optional_packages() -> list[str]:
    """The import names of every package an extra of pyproject.toml brings (dev tools aside)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    listed = {req.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for name, reqs in extras.items()
              if name not in ("all", "dev") for req in reqs if not req.startswith("sparsefit[")}  # fmt: skip
    names = {p.lower().replace("-", "_") for p in listed}
    missing = names - set(EXTRAS)
    assert not missing, f"errors.EXTRAS does not name the extra of {sorted(missing)}"
    return sorted(names | {"openai"})


def run_core(commands, tmp_path):
    script = BLOCK.format(blocked=optional_packages(), commands=commands)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS ")), proc.stderr


def test_extras_are_named_in_errors_extras():
    assert {"peft", "lm_eval", "fastapi", "compressed_tensors", "datasets"} <= set(optional_packages())


def test_core_install_loads_and_prunes_and_names_the_missing_extra(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    commands = [
        ["prune", "--model", model, "--output", str(tmp_path / "p"), "--method", "magnitude", "--sparsity", "0.5"],
        ["quantize", "--model", model, "--output", str(tmp_path / "q"), "--method", "rtn"],
        ["serve", "--model", model],
    ]
    codes, err = run_core(commands, tmp_path)
    assert codes[0] == 0, err[-2000:]
    assert json.loads((tmp_path / "p" / "sparsity.json").read_text())
    errors = [ln for ln in err.splitlines() if ln.startswith("sparsefit: error:")]
    assert codes[1:] == [2, 2], err[-2000:]
    assert "unexpected" not in err
    assert any("sparsefit[export]" in ln for ln in errors), errors
    assert any("sparsefit[serve]" in ln for ln in errors), errors


@pytest.mark.slow
def test_core_install_loads_the_builtin_model(tmp_path):
    commands = [["prune", "--model", "smollm2-135m", "--output", str(tmp_path / "p"), "--method", "magnitude"]]
    codes, err = run_core(commands, tmp_path)
    assert codes == [0], err[-2000:]
