import json

import pytest

from tests.conftest import run_cli

run = run_cli


def test_eval_writes_json(tiny_checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, _ = run(
        [
            "eval",
            "--model",
            str(tiny_checkpoint),
            "--dataset",
            "wikitext2",
            "--seq-len",
            "64",
            "--max-windows",
            "3",
            "--json",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and "ppl" in stdout
    data = json.loads(out.read_text())
    assert {"ppl", "nll", "tokens", "windows", "seq_len", "seconds", "model"} <= set(data)
    assert data["windows"] == 3 and data["tokens"] == 3 * 63


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "./missing"], "does not exist"),
        (["eval", "--model", "not-a-builtin"], "unknown model"),
        (["eval", "--dtype", "half-ish"], "unknown dtype"),
        (["eval", "--device", "tpu"], "unknown device"),
        (["eval", "--seq-len", "abc"], "invalid int value"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_seq_len_beyond_context(tiny_checkpoint, data_dir, capsys):
    code, _, err = run(["eval", "--model", str(tiny_checkpoint), "--seq-len", "4096"], capsys)
    assert code == 2 and "larger than the model's context (256)" in err


@pytest.fixture
def no_data_anywhere(tmp_path, monkeypatch):
    """A fresh machine: SPARSEFIT_DATA_DIR unset, an empty default data folder, no `datasets`."""
    monkeypatch.delenv("SPARSEFIT_DATA_DIR", raising=False)
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # `import datasets` raises ImportError
    return tmp_path / "cache" / "data"


def test_eval_without_the_data_says_where_to_put_it(tiny_checkpoint, no_data_anywhere, capsys):
    code, _, err = run(["eval", "--model", str(tiny_checkpoint), "--seq-len", "64"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("sparsefit: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    line = errors[0]
    assert str(no_data_anywhere / "wikitext-2-raw" / "wiki.test.raw") in line and "(the default data folder)" in line
    assert "set SPARSEFIT_DATA_DIR" in line and "pip install 'sparsefit[data]'" in line
    assert "Salesforce/wikitext" in line  # where the file comes from


def test_prune_without_the_data(tiny_checkpoint, no_data_anywhere, tmp_path, capsys):
    """The default calibration falls back to text the model writes, with a notice; a dataset named
    with --calib is an error that names the fix."""
    small = ["--model", str(tiny_checkpoint), "--num-samples", "2", "--seq-len", "32"]
    code, _, err = run(["prune", *small, "--output", str(tmp_path / "p")], capsys)
    assert code == 0, err
    assert "notice: the default calibration data (gsm8k) is out of reach" in err and "--calib self" in err
    code, _, err = run(["prune", *small, "--calib", "gsm8k", "--output", str(tmp_path / "q")], capsys)
    errors = [line for line in err.splitlines() if line.startswith("sparsefit: error:")]
    assert code == 2 and len(errors) == 1
    assert "set SPARSEFIT_DATA_DIR" in errors[0]
    assert errors[0].endswith("or calibrate on text the model writes: --calib self")
