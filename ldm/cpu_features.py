"""What this CPU's matmul kernels do natively (torch's own feature checks, read once)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_half_matmul(dtype: torch.dtype) -> bool:
    """True when oneDNN multiplies ``dtype`` (bf16: AMX tiles or AVX512-BF16; fp16: AMX-FP16)
    natively on this CPU; False for other dtypes, a build without oneDNN, or one without the
    checks. Elsewhere half-precision kernels are emulated, several times slower than fp32."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16:
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.cpu._is_amx_fp16_supported())
    except (AttributeError, RuntimeError):  # a build without these checks: play safe
        pass
    return False
