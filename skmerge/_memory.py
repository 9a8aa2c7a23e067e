"""How much more memory this process can take on a device, before allocating it.

On the CPU the smallest of the limits that apply: the system's
``MemAvailable``, the address-space limit (``ulimit -v``, ``RLIMIT_AS``)
minus what the process already maps, and the memory limit of its cgroup
(v2 ``memory.max``, v1 ``memory.limit_in_bytes``, of its own group and every
parent) minus the group's usage. On CUDA the driver's free memory plus what
PyTorch's caching allocator holds unused.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    import resource
except ImportError:  # not on Unix
    resource = None

__all__ = ["available_bytes"]

# Where the kernel's files are read (tests point these elsewhere).
PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number, not "max"


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes that ``device`` can still give this process; None when unknown.

    Parameters
    ----------
    device : torch.device or str

    Returns
    -------
    int or None
        Never negative.
    """
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    except RuntimeError:
        return None
    if device.type != "cpu":
        return None
    limits = [v for v in (_mem_available(), _address_space_left(), _cgroup_left()) if v is not None]
    return max(0, min(limits)) if limits else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _field_kib(text: str | None, field: str) -> int | None:
    """``field:  123 kB`` of /proc/meminfo or /proc/self/status, in bytes."""
    for line in (text or "").splitlines():
        if line.startswith(field + ":"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _mem_available() -> int | None:
    return _field_kib(_read(PROC / "meminfo"), "MemAvailable")


def _address_space_left() -> int | None:
    """``RLIMIT_AS`` (soft) minus the process's current virtual size."""
    if resource is None:
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY or limit < 0:
        return None
    return limit - (_field_kib(_read(PROC / "self" / "status"), "VmSize") or 0)


def _number(text: str | None) -> int | None:
    try:
        return int(text.strip())
    except (AttributeError, ValueError):
        return None  # missing, or "max"


def _inactive_file(text: str | None, key: str) -> int:
    """Reclaimable page cache of a cgroup's memory.stat (counted in its usage)."""
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _number(value) or 0
    return 0


def _cgroup_left() -> int | None:
    """The tightest ``limit - usage`` over this process's memory cgroup and its parents."""
    left = []
    for line in (_read(PROC / "self" / "cgroup") or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: "0::/path"
            root, files = CGROUP, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: "4:memory:/path"
            root, files = CGROUP / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                              "total_inactive_file")
        else:
            continue
        folder = root / path.strip("/")
        for group in [folder, *folder.parents]:
            limit = _number(_read(group / files[0]))
            if limit is not None and limit < _UNLIMITED:
                usage = _number(_read(group / files[1])) or 0
                usage -= _inactive_file(_read(group / "memory.stat"), files[2])
                left.append(limit - max(usage, 0))
            if group == root:
                break
    return min(left) if left else None
