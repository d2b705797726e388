"""SD's transformer feed-forward, Linear -> GEGLU gate -> Linear, as one autograd function for fp32
CPU training, computed feature-major.

Through the modules, the first linear layer writes ``y = [h, gate]`` as [N, 2 x inner] and the
gate reads both halves as strided views: PyTorch's CPU elementwise kernels run the GELU, its
backward and the products about half as fast on such views as on contiguous tensors (SD v1's 64
x 64 level, [8192, 1280] halves: GELU 6.4 vs 3.0 ms, its backward 8.2 vs 5.7 ms, 2 threads).
``geglu_feed_forward`` computes ``y^T = W1 x^T + b1`` instead ([2 x inner, N]: its halves are
contiguous blocks), the gate on them, and the second layer from the gate's transposed view (the
GEMMs take either orientation at the same rate). Its backward recomputes the gate's output from
the saved ``y`` rather than keeping it (the modules' second linear layer saves it: 42 MB per SD
v1 64 x 64 block at batch 2, about 370 MB over the U-Net). Forward+backward of SD v1's feed-forward
against the modules': 0.94 at 64 x 64, 0.98-0.99 at 32 x 32 and 16 x 16 (batch 2, 2 threads);
values and gradients differ from the modules' by the GEMMs' rounding (~3e-7 relative).

Inference runs the same operations (0.93-0.95 of the modules' time). It runs for the standard
layout only (``applies``): plain ``nn.Linear`` layers without hooks or parametrizations (a
PEFT-wrapped layer runs its own forward), no active dropout, fp32 on the CPU outside autocast and
``torch.compile``; under ``torch.func`` transforms and forward-mode AD the same layout runs as
plain differentiable operations. Double backward goes through differentiable operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.custom_autograd import custom_backward_allowed
from ldm.modules.module_hooks import hooked


def _first_linear(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, in_place: bool
) -> torch.Tensor:
    """``y^T = W1 x^T + b1`` [2 inner, N] for rows ``x`` [N, dim]; ``in_place`` (nothing
    recorded): the bias added into the product, bit-identical to addmm, which first copies the
    column-broadcast bias into all of y (55.7 vs 43.5 ms at SD v1's 64 x 64 level, y [2560, 8192])."""
    if in_place:
        return torch.mm(w1, x.t()).add_(b1.unsqueeze(1))
    return torch.addmm(b1.unsqueeze(1), w1, x.t())


def _forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    in_place: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``y^T = W1 x^T + b1`` [2 inner, N], the feed-forward's output [N, dim_out]) for rows
    ``x`` [N, dim]; ``in_place``: the gate multiplies into GELU's output (nothing recorded)."""
    y = _first_linear(x, w1, b1, in_place)
    h, gate = y.chunk(2, dim=0)  # contiguous [inner, N] each
    act = F.gelu(gate).mul_(h) if in_place else F.gelu(gate) * h
    return y, torch.addmm(b2, act.t(), w2.t())


class _GegluFeedForward(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
    ) -> torch.Tensor:
        y, out = _forward(x, w1, b1, w2, b2, in_place=True)
        ctx.save_for_backward(x, y, w1, b1, w2)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y, w1, b1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        create_graph = torch.is_grad_enabled()
        if create_graph:  # the saved y has no graph: recompute it from the inputs
            y = _first_linear(x, w1, b1, in_place=False)
        h, gate = y.chunk(2, dim=0)
        act = F.gelu(gate)
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if need_w2:
            grad_w2 = torch.mm(grad.t(), (act * h).t())
        if need_b2:
            grad_b2 = grad.sum(0)
        if not (need_x or need_w1 or need_b1):
            return grad_x, grad_w1, grad_b1, grad_w2, grad_b2
        grad_a = torch.mm(w2.t(), grad.t())  # [inner, N]
        if create_graph:  # differentiable operations only
            grad_y = torch.cat(
                [grad_a * act, torch.ops.aten.gelu_backward(grad_a * h, gate)], dim=0
            )
        else:
            grad_y = torch.empty_like(y)
            grad_h, grad_gate = grad_y.chunk(2, dim=0)
            torch.mul(grad_a, act, out=grad_h)
            torch.ops.aten.gelu_backward.grad_input(grad_a.mul_(h), gate, grad_input=grad_gate)
        if need_x:
            grad_x = torch.mm(grad_y.t(), w1)
        if need_w1:
            grad_w1 = torch.mm(grad_y, x)
        if need_b1:
            grad_b1 = grad_y.sum(1)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def applies(proj: nn.Module, dropout: nn.Module, out: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``geglu_feed_forward`` may stand in for ``out(dropout(gated_gelu(proj(x))))``."""
    linears = (proj, out)
    if not all(type(m) is nn.Linear and m.bias is not None and not hooked(m) for m in linears):
        return False
    params = (proj.weight, proj.bias, out.weight, out.bias)
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (x, *params))
        and not torch.is_autocast_enabled("cpu")
        and not hooked(dropout)
        and (not dropout.training or getattr(dropout, "p", 1.0) == 0.0)
        and not torch.compiler.is_compiling()
    )


def geglu_feed_forward(x: torch.Tensor, proj: nn.Linear, out: nn.Linear) -> torch.Tensor:
    """``out(h * gelu(gate))`` for ``h, gate = proj(x).chunk(2, -1)``, x: [..., dim], computed
    feature-major (``applies`` says when): through ``_GegluFeedForward`` where a graph is recorded,
    else the same operations directly (the same values: inference 0.93-0.95 of the modules' time
    at SD v1's levels)."""
    rows = x.reshape(-1, x.shape[-1])
    params = (proj.weight, proj.bias, out.weight, out.bias)
    graph = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    if graph and custom_backward_allowed():
        y = _GegluFeedForward.apply(rows, *params)
    else:  # the same operations (in place where nothing is recorded)
        y = _forward(rows, *params, in_place=not graph)[1]
    return y.view(*x.shape[:-1], y.shape[-1])
