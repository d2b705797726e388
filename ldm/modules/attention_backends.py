"""One scaled dot-product attention function with selectable backends (sdpa | xformers | math).

softmax(q k^T / sqrt(d)) v  (Vaswani et al. 2017, Eq. 1). All attention in the U-Net goes through
`attention()`. The backend is chosen, in order of precedence, by the `backend` argument (which the
modules fill from their `attn_backend=` config parameter), the environment variable
`LDM_ATTENTION_BACKEND`, and finally the default "sdpa". The "math" backend is the reference
implementation; it can be sliced over queries (`slice_size` argument or `LDM_ATTENTION_SLICE`) so
the full N x N score matrix is never materialized (sdpa's fused CPU/GPU kernels never build it
anyway, so the slice setting only affects "math"). Half-precision inputs are softmaxed in fp32
(SD 2.x needs it): the math backend upcasts explicitly, sdpa/xformers kernels accumulate in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ldm.cpu_features import native_half_matmul

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers", "math")
ENV_BACKEND = "LDM_ATTENTION_BACKEND"
ENV_SLICE = "LDM_ATTENTION_SLICE"

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def resolve_backend(backend: str | None = None) -> str:
    """Return the backend name to use: explicit argument, else $LDM_ATTENTION_BACKEND, else sdpa."""
    name = backend if backend is not None else os.environ.get(ENV_BACKEND) or "sdpa"
    name = name.strip().lower()
    if name not in BACKENDS:
        source = "attn_backend argument" if backend is not None else f"${ENV_BACKEND}"
        raise ValueError(
            f"Unknown attention backend {name!r} (from {source}); expected one of {BACKENDS}."
        )
    return name


_slice_default: list[int | None] = [None]  # set by `attention_slicing`, read at call time


@contextlib.contextmanager
def attention_slicing(slice_size: int | None) -> Iterator[None]:
    """Attention in slices of ``slice_size`` queries inside the block (None / 0: unsliced)."""
    previous = _slice_default[0]
    _slice_default[0] = int(slice_size) if slice_size else None
    try:
        yield
    finally:
        _slice_default[0] = previous


def _slice_size(slice_size: int | None) -> int | None:
    if slice_size is not None:
        return int(slice_size) if slice_size > 0 else None
    if _slice_default[0] is not None:
        return _slice_default[0]
    env = os.environ.get(ENV_SLICE)  # a user setting; code inside ldm uses attention_slicing
    if not env:
        return None
    try:
        value = int(env)
    except ValueError as err:
        raise ValueError(
            f"${ENV_SLICE} must be a positive integer (queries per slice), got {env!r}"
        ) from err
    return value if value > 0 else None


def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: PLC0415 (optional dependency)
    except Exception:  # ImportError, or a broken build raising at import
        return None
    return xops


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    slice_size: int | None = None,
) -> torch.Tensor:
    """Reference attention softmax(q k^T * scale) v, optionally in query slices; fp32 softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_q = q.shape[-2]
    step = n_q if slice_size is None else min(slice_size, n_q)
    upcast = q.dtype in (torch.float16, torch.bfloat16)
    kt = (k.float() if upcast else k).transpose(-1, -2)  # [B, H, d, M]
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=q.device)
    for start in range(0, n_q, step):
        q_s = q[..., start : start + step, :]
        sim = (q_s.float() if upcast else q_s) @ kt * scale  # [B, H, n, M]
        if mask is not None:
            m = mask[..., start : start + step, :] if mask.shape[-2] == n_q else mask
            if m.dtype == torch.bool:
                sim = sim.masked_fill(~m, torch.finfo(sim.dtype).min)
            else:
                sim = sim + m.to(sim.dtype)
        out[..., start : start + step, :] = sim.softmax(dim=-1).to(v.dtype) @ v
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    slice_size: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017, Eq. 1); q, k, v and out: [B, H, N, d].

    mask: bool (True = attend) or additive float, broadcastable to [B, H, N, M].
    """
    if q.ndim != 4:
        raise ValueError(
            f"attention expects q, k, v of shape [B, heads, N, d], got q {tuple(q.shape)}"
        )
    name = resolve_backend(backend)
    if name == "xformers":
        xops = _xformers_ops()
        if xops is None or not q.is_cuda:
            why = "xformers is not installed" if xops is None else f"tensors are on {q.device.type}"
            _warn_once(
                f"xformers-{why}",
                f"attention backend 'xformers' unavailable ({why}); using 'sdpa'.",
            )
            name = "sdpa"
        else:
            bias = None
            if mask is not None:
                bias = mask
                if mask.dtype == torch.bool:
                    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
                    bias = bias.masked_fill(~mask, -math.inf)
                bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            # xformers layout is [B, N, H, d]
            out = xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
            )
            return out.transpose(1, 2)  # [B, H, N, d]
    if name == "math":
        return math_attention(q, k, v, mask=mask, scale=scale, slice_size=_slice_size(slice_size))
    if _upcast_for_cpu_backward(q, k, v):
        with torch.autocast("cpu", enabled=False):
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            out = _sdpa(q.float(), k.float(), v.float(), mask, scale)
        return out.to(q.dtype)
    return _sdpa(q, k, v, mask, scale)


#: PyTorch's CPU flash attention (fp32) runs a key count just short of a multiple of 16 slowly:
#: SD's 77-token cross-attention at 64 x 64 latents (batch 2, 8 heads x 40) took 10.2-10.4 ms
#: forward against 6.3 ms for 80 keys (torch 2.14.1, Xeon AVX-512, 2 threads). From this many keys
#: past a multiple of 16, and from ``KEY_PAD_MIN_QUERIES`` queries up to ``KEY_PAD_MAX_KEYS``
#: keys, `attention` pads the keys and values with zeros to the next multiple of 16 and masks the
#: padding out (-inf logits: the same softmax over the real keys). Forward+backward / forward
#: against unpadded: 77 keys 0.79 / 0.61 (64 x 64, d 40), 0.81 / 0.66 (32 x 32, d 80), 0.90 /
#: 0.84 (16 x 16, d 160), 0.79 / 0.68 (SD 2.x, d 64); 24-56 keys 0.82-0.96 / 0.56-0.71, 90-231
#: keys 0.87-0.96 / 0.80-0.97. A remainder of 2 or 4 (50, 100 keys) measured 1.04-1.10 and stays
#: unpadded.
KEY_PAD_MIN_REMAINDER = 7
KEY_PAD_MIN_QUERIES = 256
KEY_PAD_MAX_KEYS = 256

#: PyTorch's fp32 CPU flash kernel reads q, k and v faster laid out [B, H, N, d] in memory than as
#: views of another layout in some cases, where `attention` copies them into that layout first
#: (``_contiguous_heads``; copies counted in every ratio below, batch 1-8, interleaved medians,
#: forward+backward / forward against the views).
#: - Head-split views of a linear layer's [B, N, H * d] output (unit last stride), from this many
#:   queries and keys: SD v1 64 x 64 (8 heads x 40, 4096 tokens) 0.97-0.98 / 0.97-0.98, SD 2.x (5 x
#:   64) 0.99 / 1.00, SDXL (10 x 64) 0.98 / 0.99, 48 x 48 latents (8 x 40) 0.98 / 0.99. 1024 tokens
#:   measured 0.99-1.01 / 1.02-1.05, and shorter sequences or 77-80 keys 1.04-1.12 / 1.16-1.28:
#:   they keep the views.
CONTIGUOUS_MIN_TOKENS = 2048
#: - Channel-major views ([B, H, d, N] transposed: the 1x1-conv q, k, v of guided-diffusion's
#:   ``AttentionBlock`` and of the autoencoder's mid-block), where the kernel is slowest: in
#:   inference up to this head dimension (32-64: 0.35-0.68 at 64-4096 positions; 128: 0.56-0.98),
#:   or from ``CONTIGUOUS_MIN_TOKENS`` positions (one head of 256: 0.76 at 4096, of 512: 0.89-0.97
#:   at 2048-4096); one head of 256-512 at 256-1024 positions measured 0.84-1.24 and stays;
CHANNEL_MAJOR_MAX_HEAD_DIM = 128
#: - and with a graph to differentiate up to this one (32-64: 0.58-0.98); wider heads lose there
#:   (128: 0.92-1.21, 256: 1.04-1.22, 512: 1.18-1.48, the VAE's 4096-position attention included).
CHANNEL_MAJOR_MAX_HEAD_DIM_GRAD = 64


def _contiguous_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` hands fp32 CPU q, k, v to PyTorch's kernel as contiguous copies (the
    policy measured above ``CONTIGUOUS_MIN_TOKENS``)."""
    if all(t.is_contiguous() for t in (q, k, v)):
        return False
    tokens = min(q.shape[-2], k.shape[-2])
    if all(t.stride(-1) == 1 for t in (q, k, v)):
        return tokens >= CONTIGUOUS_MIN_TOKENS
    head_dim = max(q.shape[-1], v.shape[-1])
    if _records_graph(q, k, v):
        return head_dim <= CHANNEL_MAJOR_MAX_HEAD_DIM_GRAD
    return head_dim <= CHANNEL_MAJOR_MAX_HEAD_DIM or tokens >= CONTIGUOUS_MIN_TOKENS


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, with the keys padded to a multiple of 16 where PyTorch's
    fp32 CPU kernel is faster that way (see ``KEY_PAD_MIN_REMAINDER``), and q, k, v made contiguous
    where it reads them faster so (``_contiguous_heads``)."""
    keys = k.shape[-2]
    cpu_fp32 = (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and not torch.compiler.is_compiling()
    )
    if cpu_fp32 and _contiguous_heads(q, k, v):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if (
        mask is None
        and cpu_fp32
        and keys % 16 >= KEY_PAD_MIN_REMAINDER
        and keys <= KEY_PAD_MAX_KEYS
        and q.shape[-2] >= KEY_PAD_MIN_QUERIES
    ):
        pad = 16 - keys % 16
        k = F.pad(k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
        mask = torch.zeros(1, 1, 1, keys + pad, dtype=q.dtype, device=q.device)
        mask[..., keys:] = -math.inf
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


#: Whether half-precision (bf16/fp16) CPU attention whose graph is recorded for a backward may
#: run in fp32 (``_upcast_for_cpu_backward`` says when); False: always the half-precision kernel.
CPU_HALF_BACKWARD_IN_FP32 = True

#: On a CPU that multiplies the half type natively (AMX or AVX512-BF16 for bf16): the largest
#: queries x keys x head dim that `attention` computes in fp32 when the graph will be
#: differentiated. PyTorch's CPU flash-attention backward in half precision costs about 0.08 ms
#: per (batch, head) slice however small the slice, so a training step of small attention (many
#: short sequences: 64 x 2 heads x 64 queries) ran 3-8x slower than the same attention upcast to
#: fp32 (benchmarks/bench_cpu_half_attention.py, Xeon with AMX); from about this size on (SD's 64 x
#: 64 self-attention: 4096 x 4096 x 40) half precision was as fast or faster there.
#: On a CPU without native half-precision matmul every size runs in fp32: the half kernels are
#: emulated there (Xeon with AVX-512 but no BF16/AMX, torch 2.14.1: bf16 forward+backward 2.0 s vs
#: 0.78 s upcast for 4096 x 4096 x 40, 0.20 vs 0.08 s for 1024 x 1024 x 80; fp16 7-15x slower).
CPU_HALF_BACKWARD_UPCAST_MAX = 1 << 22


def _upcast_for_cpu_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True for half-precision CPU attention whose graph is recorded for a backward, and is small
    or on a CPU without native half-precision matmul."""
    if not (
        CPU_HALF_BACKWARD_IN_FP32
        and q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and _records_graph(q, k, v)
    ):
        return False
    small = q.shape[-2] * k.shape[-2] * q.shape[-1] <= CPU_HALF_BACKWARD_UPCAST_MAX
    return small or not native_half_matmul(q.dtype)


def _records_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this attention is recorded for a backward."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
