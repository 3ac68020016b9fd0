"""Side modules: small trainable pieces riding on a linear (SLoRB branches, row-delta adapters).

Each is a child module of its linear under a fixed attribute name (`slorb`, `row_delta`), applied
by a forward hook on the linear (the mechanism `torch.nn.utils.prune` uses), and saved beside the
weights in a safetensors file of its own whose metadata names its format. This file holds what the
kinds share: attach, find, remove, pick their tensors out of a state dict, write and read the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

Hook = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]


def describe(t: torch.Tensor) -> str:
    """`dtype (shape)`, as error messages show a tensor."""
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def attach_side(module: nn.Module, attr: str, side: nn.Module, hook: Hook, name: str) -> None:
    """Make `side` the child `attr` of `module`, applied by `hook` after the module's forward."""
    if isinstance(getattr(module, attr, None), type(side)):
        raise ValueError(f"{name} already has a {attr} module")
    module.add_module(attr, side)
    side._hook = module.register_forward_hook(hook)  # noqa: SLF001 - our own module


def side_modules(model: nn.Module, attr: str, kind: type[nn.Module]) -> dict[str, nn.Module]:
    """The modules of `model` carrying a `kind` child named `attr`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, attr, None), kind)}


def detach_sides(model: nn.Module, attr: str, kind: type[nn.Module]) -> int:
    """Remove every `attr` child of kind `kind` with its hook; returns how many were removed."""
    found = side_modules(model, attr, kind)
    for module in found.values():
        getattr(module, attr)._hook.remove()  # noqa: SLF001
        delattr(module, attr)
    return len(found)


def side_state(model: nn.Module, attr: str, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """The side modules' tensors by state-dict name (from `state_dict` when given: a sharded model's
    gathered weights)."""
    state = state_dict if state_dict is not None else model.state_dict()
    return {key: value for key, value in state.items() if f".{attr}." in key}


def save_side_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from sparsefit.models.finite import refuse_non_finite

    refuse_non_finite(tensors, f"cannot write {path}", "the side modules' values are damaged (a diverged fine-tune)")
    data = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    save_file(data, str(path), metadata=metadata)


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of the safetensors file `path` (views of the mapped file: no copy);
    a ValueError naming the file when it cannot be read as one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0][:120]})") from None


def read_side_file(
    model: nn.Module, folder: str | os.PathLike, filename: str, attr: str, fmt: str, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, nn.Module]] | None:
    """The tensors and metadata of `folder/filename` and the modules they belong to, by name; None
    when there is no such file. A ValueError when the file is not of format `fmt` or names modules
    `model` lacks (`what` names the kind in the message)."""
    from sparsefit.models.finite import bad_values

    path = Path(folder) / filename
    if not path.is_file():
        return None
    meta, tensors = read_safetensors(path)
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a sparsefit {what} file")
    bad = [key for key in tensors if f".{attr}." not in key]
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]} is not a {what} tensor (names end in .{attr}.<part>)")
    for key, t in tensors.items():
        n = bad_values(t)
        if n:
            raise ValueError(f"{path}: tensor {key} holds {n} NaN or infinite values")
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(f".{attr}.", 1)[0] for key in tensors})
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"{path} names modules the model lacks ({', '.join(unknown[:2])})")
    return tensors, meta, {n: modules[n] for n in names}
