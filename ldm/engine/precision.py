"""Sampling precision: which float type the network runs in while ``generate`` samples.

``full`` (fp32), ``bf16``, ``fp16``, or ``autocast`` / ``auto``: the device's best half type
(fp16 on CUDA; bf16 on a CPU with native bf16 matmul, AMX or AVX512-BF16, for a network of at
least ``BF16_MIN_PARAMS`` parameters; fp32 on other CPUs and MPS). The size floor is measured:
the SD-v1 U-Net samples faster in bf16, the 4M-parameter default shapes model slower (casts and
small-kernel overhead outweigh the faster matmuls). Half types run the denoiser under ``torch.autocast`` (chosen over casting the U-Net's
weights by measurement: ``benchmarks/bench_precision.py``, README "Precision"); the first stage
always decodes in float32. When neither the call nor the model's recorded sampling defaults
name a precision, ``$LDM_PRECISION`` does, else ``auto``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from ldm.cpu_features import native_half_matmul

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "autocast", "full", "fp32", "bf16", "fp16")
ENV_PRECISION = "LDM_PRECISION"
#: ``autocast`` on a CPU picks bf16 only for networks at least this big (README "Precision")
BF16_MIN_PARAMS = 50_000_000
DTYPES = {
    "full": torch.float32,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AMX tiles or AVX512-BF16) through oneDNN
    (``ldm.cpu_features.native_half_matmul``)."""
    return native_half_matmul(torch.bfloat16)


def check_precision(name: str, where: str = "precision") -> str:
    """``name`` lower-cased, or a ValueError naming the valid values."""
    value = str(name).strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"{where}: unknown precision {name!r}; expected one of {list(PRECISIONS)}")
    return value


def default_precision() -> str:
    """``$LDM_PRECISION`` when set, else ``auto``."""
    env = os.environ.get(ENV_PRECISION)
    return check_precision(env, f"${ENV_PRECISION}") if env else "auto"


def resolve_dtype(name: str | None, device: torch.device, params: int | None = None) -> torch.dtype:
    """The float type the denoiser runs in on ``device`` for precision ``name`` (None: default);
    ``params``: the network's parameter count (None: big enough for bf16)."""
    name = check_precision(name) if name is not None else default_precision()
    if name in DTYPES:
        return DTYPES[name]
    if device.type == "cuda":
        return torch.float16
    big = params is None or params >= BF16_MIN_PARAMS
    if device.type == "cpu" and big and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def sampling_precision(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` (nothing for float32)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def model_dtype(model: object, precision: str | None = None) -> torch.dtype:
    """What ``generate(model, precision=precision)`` samples in: the argument, else the model's
    recorded default, else ``$LDM_PRECISION``, else autocast, on the model's device."""
    if precision is None:
        precision = (getattr(model, "sampling_defaults", None) or {}).get("precision")
    net = getattr(model, "model", None)
    params = sum(p.numel() for p in net.parameters()) if isinstance(net, torch.nn.Module) else None
    device = getattr(model, "device", None) or torch.device("cpu")
    return resolve_dtype(precision, device, params)
