"""Keep memory that glibc's malloc frees inside the process, for the commands' long CPU runs.

PyTorch allocates CPU tensors with ``malloc``. glibc serves a request above its mmap threshold
(128 KiB, rising to at most 32 MiB) with a fresh ``mmap`` that ``free`` unmaps again, and gives
the top of its heap back to the kernel once more than the trim threshold is free there. A training
step allocates and frees the same large tensors every time (weight gradients, activations, GEGLU
projections), so every step faults them in again page by page, and the kernel zeroes each page.
On a virtual machine whose freed guest memory goes back to the host (virtio-balloon free page
reporting, as on this project's machines) each of those faults is also a host page fault.

Measured on such a machine (Xeon, 2 threads, torch 2.14.1), SD v1 U-Net, batch 2, 64x64 latents,
fp32 forward+backward with fresh gradients each step: 19.9-21.5 s per step under glibc's defaults,
16.5-17.7 s with freed memory kept, peak resident memory 10.0 GB and 10.6 GB (flat after the first
steps); in the same processes diffusers' U-Net took 23.7 s and 20.3 s. Zeroing a fresh 59 MB weight
gradient took 75 ms inside a training step against 3-5 ms when its pages had been used recently.

``retain_freed_memory`` turns both returns off (``mallopt``: no ``mmap`` for allocations, no heap
trimming), so freed blocks are reused by the next step: the process keeps its peak footprint
instead of giving memory back between steps (the same trade PyTorch's CUDA caching allocator
makes), plus a few large blocks that glibc's aligned allocations leave in its bins before reusing
them (the 6% above). ``main.py``, ``python -m ldm`` and the sampling commands call it at start; set
``LDM_RETAIN_MEMORY=0`` to keep the allocator's defaults. A no-op off glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

from ldm.modules.weight_cache import env_switch

logger = logging.getLogger(__name__)

#: ``LDM_RETAIN_MEMORY=0`` keeps glibc's defaults in the commands
ENV = "LDM_RETAIN_MEMORY"
# mallopt parameters, <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: bool | None = None


def _glibc_mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl's mallopt is a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def retain_freed_memory() -> bool:
    """Keep freed memory in this process (see the module's docstring); True when it is in force.

    Idempotent. Does nothing (returns False) with ``LDM_RETAIN_MEMORY=0`` or off glibc; another
    value than a switch word exits with a usage error (code 2). Child processes forked after the
    call (data-loader workers) inherit the setting."""
    global _applied
    if _applied is not None:
        return _applied
    try:
        keep = env_switch(
            ENV, off="glibc's allocator defaults", on="freed memory stays in the process"
        )
    except ValueError as err:  # called by the commands before anything else: a usage error
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
    if not keep:
        logger.debug("%s=0: glibc's allocator keeps its defaults", ENV)
        _applied = False
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        _applied = False
        return False
    # -1 turns trimming off; no mmap-ed chunks: large blocks come from the heap and stay there
    _applied = bool(mallopt(M_TRIM_THRESHOLD, -1)) and bool(mallopt(M_MMAP_MAX, 0))
    logger.debug("freed memory kept in the process (glibc mallopt): %s", _applied)
    return _applied


def retained() -> bool:
    """Whether ``retain_freed_memory`` is in force in this process (fresh large buffers then
    reuse freed memory instead of faulting pages in: size policies such as the Winograd
    convolution's read it)."""
    return bool(_applied)
