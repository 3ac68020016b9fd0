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
