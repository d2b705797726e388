"""open_clip's text residual blocks without ``nn.MultiheadAttention``'s batch-first detour.

open_clip (2.x batch-first and later) builds its text blocks' attention as
``nn.MultiheadAttention(batch_first=True)``. Outside its native fast path (it is off with
open_clip's float causal mask) that module transposes its [B, L, D] input to a [L, B, D] view and
runs the packed q/k/v projection on it; on a non-contiguous 3-D input ``F.linear`` falls back to
one matmul per position (``torch.matmul``'s batched form) of only B rows each. On the CPU that made
SD 2.x's text encoder (OpenCLIP ViT-H/14, 23 blocks, 2 x 77 tokens) 1.7x slower than transformers'
``CLIPTextModel`` with the same weights: the in-projection took 12 ms per block instead of ~1.6.

``block_forward(block, x, attn_mask)`` runs one ``ResidualAttentionBlock`` on batch-first ``x`` with
the same parameters and operations (pre-norm, one GEMM for q, k and v, scaled dot-product attention
with the block's mask, the output projection, LayerScale / Identity, the MLP), reading the
attention's weights as ``nn.MultiheadAttention`` does and calling every other submodule as a
module, so their hooks and wrappers (PEFT layers on the MLP) still run. It applies
(``fast_block_applies``) to a standard block (no cross-attention norm, the attention module
unhooked, packed q/k/v of equal size, no bias_k / bias_v / zero attention) on a batch-first input;
anything else runs the block itself. ``LDM_FAST_TEXT=0`` switches it off with the CLIP fast path.
Results equal the block's to float rounding (the GEMMs' summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.clip_fast import fast_text_enabled
from ldm.modules.module_hooks import hooked


def fast_block_applies(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``block_forward`` stands in for ``block(x, attn_mask=...)`` (module docstring)."""
    attn = getattr(block, "attn", None)
    if (
        not isinstance(attn, nn.MultiheadAttention)
        or not attn.batch_first
        or x.dim() != 3
        or hasattr(block, "ln_1_kv")
        or not all(hasattr(block, n) for n in ("ln_1", "ln_2", "ls_1", "ls_2", "mlp"))
        or not attn._qkv_same_embed_dim
        or attn.in_proj_weight is None
        or attn.bias_k is not None
        or attn.bias_v is not None
        or attn.add_zero_attn
        or hooked(block)
        or hooked(attn)
        or hooked(attn.out_proj)  # hooked() counts global hooks too
        or torch.jit.is_scripting()
    ):
        return False
    return fast_text_enabled()


def _sdpa_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask as open_clip's ``ResidualAttentionBlock.attention`` hands it on: cast to the
    activations' dtype and added to the scores (a bool mask becomes 0 / 1, as there)."""
    return None if attn_mask is None else attn_mask.to(dtype)


def block_forward(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` on batch-first ``x`` [B, L, D] -> [B, L, D]."""
    attn = block.attn
    h = block.ln_1(x)
    b, n, d = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # one GEMM over B * L rows
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each [B, H, L, d]
    o = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=_sdpa_mask(attn_mask, h.dtype),
        dropout_p=attn.dropout if attn.training else 0.0,
    )
    o = F.linear(o.transpose(1, 2).reshape(b, n, d), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def run_block(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``block_forward`` where it applies, else ``block(x, attn_mask=attn_mask)``."""
    if fast_block_applies(block, x):
        return block_forward(block, x, attn_mask)
    return block(x, attn_mask=attn_mask)


__all__ = ["block_forward", "fast_block_applies", "run_block"]
