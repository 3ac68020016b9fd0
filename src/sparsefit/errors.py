"""Errors that reach the user as one line, never as a stack trace."""

import re


class SparsefitError(Exception):
    """A failure sparsefit can explain in one line (exit code 1)."""

    exit_code = 1


class UsageError(SparsefitError):
    """Bad input from the user: a path, a name, a flag value (exit code 2)."""

    exit_code = 2


class Interrupted(SparsefitError):
    """A run stopped by a signal after saving what it could; exits with 128 + the signal number
    (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


# Optional packages and the extra of sparsefit that brings each (by import name).
EXTRAS = {
    "datasets": "data",
    "lm_eval": "eval",
    "peft": "peft",
    "matplotlib": "plots",
    "compressed_tensors": "export",
    "torchao": "gpu",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "openai": "dev",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
    "mlflow_skinny": "mlflow",  # the pip name of the extra's package, which installs the module mlflow
}
# Import names whose pip name differs (beyond "_" -> "-").
_PIP_NAMES = {"yaml": "pyyaml", "google": "protobuf", "sentencepiece": "sentencepiece", "mlflow": "mlflow-skinny"}
# transformers' wording: "accelerate is required when loading a GGUF file `pip install accelerate`."
_REQUIRED = re.compile(r"\b([A-Za-z][\w.-]*) is required\b.*?pip install[ `'\"]+([A-Za-z][\w.\-]*)", re.S)


def missing_package(err: BaseException) -> str | None:
    """The one-line message for an error that says a package is not installed (the package and the
    pip command), or None when `err` is not one. A module that is there but fails to import is not
    a missing package."""
    import importlib.util

    name = None
    if isinstance(err, ModuleNotFoundError) and err.name:
        name = err.name.split(".")[0]
    elif isinstance(err, (ImportError, ValueError)):
        match = _REQUIRED.search(str(err))
        name = match.group(2) if match else None
    if not name or name == "sparsefit":
        return None
    module = name.replace("-", "_")
    if isinstance(err, ModuleNotFoundError) and "." in err.name:
        try:
            if importlib.util.find_spec(module) is not None:
                return None  # the package is there but lacks a submodule: not a package to install
        except (ImportError, ValueError):
            pass
    pip = _PIP_NAMES.get(module, module.replace("_", "-"))
    extra = EXTRAS.get(module)
    how = f"pip install 'sparsefit[{extra}]' (or {pip})" if extra else f"pip install {pip} (or reinstall sparsefit)"
    return f"the package '{pip}' is needed here but is not installed: {how}"
