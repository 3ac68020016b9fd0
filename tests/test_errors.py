"""A missing optional package is named with its pip command, never reported as an unexpected error."""

from pathlib import Path

import pytest
import tomllib

from sparsefit.errors import missing_package

GGUF_WITHOUT_ACCELERATE = "accelerate is required when loading a GGUF file `pip install accelerate`."


def test_missing_module_names_the_extra_and_the_package():
    message = missing_package(ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval"))
    assert (
        message
        == "the package 'lm-eval' is needed here but is not installed: pip install 'sparsefit[eval]' (or lm-eval)"
    )
    message = missing_package(ModuleNotFoundError("No module named 'yaml'", name="yaml"))
    assert "pip install pyyaml" in message


def test_transformers_wording_names_the_package():
    message = missing_package(ValueError(GGUF_WITHOUT_ACCELERATE))
    expected = "the package 'accelerate' is needed here but is not installed: pip install accelerate"
    assert message == f"{expected} (or reinstall sparsefit)"


@pytest.mark.parametrize(
    "err",
    [
        ValueError("shapes do not match"),
        ImportError("cannot import name 'x' from 'sparsefit.models'", name="sparsefit.models"),
        ModuleNotFoundError("No module named 'sparsefit.nope'", name="sparsefit.nope"),
        ModuleNotFoundError("No module named 'torch.nope'", name="torch.nope"),  # torch is there
        RuntimeError("accelerate is required"),
    ],
)
def test_other_errors_are_not_missing_packages(err):
    assert missing_package(err) is None


def test_the_core_install_carries_what_loading_the_builtin_gguf_model_needs():
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in deps}
    assert {"transformers", "gguf", "accelerate", "safetensors"} <= names


def test_a_missing_package_in_a_command_is_one_line_with_the_pip_command(monkeypatch, capsys):
    import sparsefit.cli.models as cli
    from sparsefit.cli import main

    def needs_peft(args):
        raise ModuleNotFoundError("No module named 'peft'", name="peft")

    monkeypatch.setattr(cli, "cmd_models", needs_peft)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected" not in err
    assert (
        "sparsefit: error: the package 'peft' is needed here but is not installed: pip install 'sparsefit[peft]'" in err
    )


def test_a_gguf_model_without_accelerate_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """transformers' own refusal (accelerate missing) simulated where it is raised: in from_pretrained."""
    import transformers

    from sparsefit.cli import main
    from sparsefit.errors import UsageError
    from sparsefit.models.builtin import gguf_to_checkpoint

    def refuse(*args, **kwargs):
        raise ValueError(GGUF_WITHOUT_ACCELERATE)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UsageError, match=r"cannot read the GGUF file m.gguf: the package 'accelerate' .*pip install"):
        gguf_to_checkpoint(gguf, tmp_path / "out")
    assert main(["eval", "--model", str(gguf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected" not in err and "damaged" not in err
    assert "the package 'accelerate' is needed here but is not installed: pip install accelerate" in err


def test_python_dash_m_sparsefit_exits_with_the_commands_status(tmp_path):
    import subprocess
    import sys

    command = ["prune", "--model", str(tmp_path / "absent"), "--output", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-m", "sparsefit", *command], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("sparsefit: error:")
