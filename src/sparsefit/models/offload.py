"""Disk offload of finished parts of a model, and of paused activations: their bytes move to a file
and come back on demand.

Layer-by-layer pruning only computes on one block at a time, yet a pruned block's weights are
fresh memory (the unpruned ones are pages of the mapped checkpoint, read only when used). Writing a
finished block to a safetensors file and mapping it back privately and lazily turns those weights
into file pages again: they cost no resident memory until something reads them (a later save, an
evaluation), and the kernel can drop them again under pressure. The same holds for the inputs that
the sequential order's paused forwards wait with (`offload_tensor_`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsefit.errors import UsageError


def prepare_offload_dir(directory: str | os.PathLike) -> Path:
    """Create `directory` if needed and check it can take files; a usage error names the problem."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".sparsefit-probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"offload directory '{path}' is not writable ({err.strerror}); pass another --offload-dir"
        ) from None
    return path


def on_ram_filesystem(path: str | os.PathLike, mounts: str | None = None) -> bool:
    """Whether `path` lies on a RAM-backed filesystem (tmpfs, ramfs), where files still cost memory.

    `mounts` is the text of /proc/mounts (read when None; elsewhere than Linux the answer is False).
    """
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False
    target = str(Path(path).resolve())
    best, fstype = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")  # /proc/mounts escapes spaces
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, parts[2]
    return fstype in ("tmpfs", "ramfs")


def offload_parameters(named: Iterable[tuple[str, nn.Parameter]], directory: Path) -> int:
    """Move CPU parameters (`module.named_parameters()`) to a file in `directory`, mapped back lazily.

    Returns the bytes moved. Values and dtypes are unchanged; the parameters stay writable (a write
    copies that page). The file is unlinked once mapped (Linux keeps a mapped file alive until it is
    unmapped), so nothing is left behind even if the process dies. The parameters' old memory is
    released, so no other tensor may view it (tied weights must be the same `Parameter`, as in HF).
    """
    params = {name: p for name, p in named if p.device.type == "cpu" and p.numel()}
    if not params:
        return 0
    path = directory / f"offload-{uuid.uuid4().hex}.safetensors"
    save_file({name: p.detach().contiguous() for name, p in params.items()}, str(path))
    # The old tensors stay referenced until their pages are released: freed memory could be reused at once.
    old = [p.data for p in params.values()]
    try:
        with safe_open(str(path), framework="pt") as f:
            for name, p in params.items():
                p.data = f.get_tensor(name)
    finally:
        path.unlink(missing_ok=True)
    sizes = [t.numel() * t.element_size() for t in old]
    for t, size in zip(old, sizes):
        if t.is_contiguous():  # then its bytes are exactly [data_ptr, data_ptr + size)
            _release(t.data_ptr(), size)
    return sum(sizes)


def offload_tensor_(tensor: torch.Tensor, directory: Path) -> int:
    """Move a CPU tensor's bytes to a file in `directory` and map them back lazily, in place.

    Every reference to this tensor object sees the same values afterwards, now as file pages that
    are resident only once read. Returns the bytes moved: 0 (and nothing done) unless the tensor is
    contiguous and alone in its storage, since only then is its memory freed. Another view of the
    same storage, if any, keeps the old bytes and no longer shares later in-place writes.
    """
    nbytes = tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    if (
        tensor.device.type != "cpu"
        or not nbytes
        or tensor._base is not None
        or not tensor.is_contiguous()
        or tensor.storage_offset()
        or storage.nbytes() != nbytes
    ):
        return 0
    path = directory / f"activation-{uuid.uuid4().hex}.bin"
    try:
        with open(path, "xb") as f:
            f.write(tensor.detach().reshape(-1).view(torch.uint8).numpy().data)
        mapped = torch.UntypedStorage.from_file(str(path), False, nbytes)  # private: writes stay in memory
    finally:
        path.unlink(missing_ok=True)  # the mapping keeps the file's pages
    with torch.no_grad():
        tensor.set_(mapped, 0, tensor.size(), tensor.stride())
    return nbytes


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4


def _release(addr: int, size: int) -> None:
    """Drop the whole pages of [addr, addr + size) from resident memory (Linux; elsewhere a no-op).

    The bytes belonged to a tensor no longer in use, possibly inside a larger storage that stays
    alive (a checkpoint mapped as one buffer), so freeing the tensor alone would release nothing.
    """
    start = -(-addr // _PAGE) * _PAGE
    end = (addr + size) // _PAGE * _PAGE
    if _LIBC is not None and end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def release_free_heap() -> None:
    """Return the free pages of the C heap to the OS (glibc's malloc_trim; elsewhere a no-op).

    Many activations alive at once, interleaved with short-lived ones of other sizes, fragment the
    heap: freed holes stay resident and the next, larger request grows it. Trimming between the
    phases that allocate them keeps resident memory near what is alive.
    """
    if _TRIM is not None:
        _TRIM(0)


_TRIM = getattr(_LIBC, "malloc_trim", None)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def reuse_freed_memory() -> bool:
    """Serve every allocation from the C heap and keep what is freed there (glibc; elsewhere a no-op).

    A training step allocates and frees tensors of hundreds of MB (logits over the vocabulary, their
    softmaxes and gradients). glibc maps each allocation above 32 MB afresh and unmaps it when freed,
    so every step faults all of those pages in again, zeroed by the kernel. Kept in the heap, the next
    step reuses them; `release_free_heap` still returns free pages when asked. The setting is
    process-wide: the CLI makes it for the commands that train, a library call never does. Returns
    whether it took.
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None or platform.libc_ver()[0] != "glibc":
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


_MADV_POPULATE_READ = 22  # Linux 5.14 and later


def prefault(tensor: torch.Tensor) -> bool:
    """Map in the file pages behind an offloaded CPU tensor in one call, before it is read.

    Read by a computation instead, each 4 KiB page costs its own fault; one `madvise` maps them all
    at a fraction of that. Returns whether it did: not elsewhere than Linux, nor on a kernel without
    MADV_POPULATE_READ (the pages then come in as they are read, as before).
    """
    if _LIBC is None or tensor.device.type != "cpu" or not tensor.numel():
        return False
    start = tensor.data_ptr() // _PAGE * _PAGE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    return _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_POPULATE_READ) == 0


@functools.cache
def _statm(pid: int) -> int:
    """An open descriptor of process `pid`'s statm (keyed by pid: a forked child has its own)."""
    return os.open(f"/proc/{pid}/statm", os.O_RDONLY)


def resident_mb() -> float:
    """This process's resident memory now, in MiB (Linux; 0 elsewhere).

    Called before every pause of every calibration batch, so the file stays open and is read again
    from its start rather than opened each time.
    """
    try:
        return int(os.pread(_statm(os.getpid()), 128, 0).split()[1]) * _PAGE / 2**20
    except OSError:
        return 0.0


@dataclass
class HeapCeiling:
    """Keep resident memory near what the first block of a layer-by-layer run needed.

    Every block does the same work on tensors of the same sizes, so a later block holding more than
    the first is holding freed heap: with many activations alive at once, the heap fragments and a
    request no hole fits grows it while the holes stay resident (by 150 MB and more, differently from
    one run to the next). `check` learns the first block's peak; after `end_block`, a check above
    that peak plus `slack_mb` returns the free heap to the OS. Trims cost page faults when the heap
    is reused, so they are done only when needed (17-41 times in a run on the embedded model).
    """

    slack_mb: float = 64.0
    ceiling_mb: float | None = None
    trims: int = 0
    _peak_mb: float = 0.0

    def check(self) -> None:
        now = resident_mb()
        if self.ceiling_mb is None:
            self._peak_mb = max(self._peak_mb, now)
        elif now > self.ceiling_mb:
            release_free_heap()
            self.trims += 1

    def end_block(self) -> None:
        if self.ceiling_mb is None and self._peak_mb:
            self.ceiling_mb = self._peak_mb + self.slack_mb
