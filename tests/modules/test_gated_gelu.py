"""GEGLU's gate with its one-tensor backward: bit-exact against the plain expression, exact
derivatives, less saved for the backward, and the plain path where it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ldm.modules.attention import GEGLU
from ldm.modules.gated_gelu import gated_gelu


def _plain(y: torch.Tensor) -> torch.Tensor:
    h, gate = y.chunk(2, dim=-1)
    return h * F.gelu(gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 40), (3, 7, 2), (5, 2560)])
def test_bit_exact_against_the_plain_expression(dtype, shape) -> None:
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(*shape, generator=g) * 3).to(dtype)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(dtype)
    ya, yb = y.clone().requires_grad_(), y.clone().requires_grad_()
    a, b = gated_gelu(ya), _plain(yb)
    assert type(a.grad_fn).__name__ == "_GatedGeluBackward"
    assert torch.equal(a, b)
    a.backward(dout)
    b.backward(dout)
    assert torch.equal(ya.grad, yb.grad)


def test_exact_first_and_second_derivatives() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randn(3, 5, 8, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(gated_gelu, (y,))
    assert torch.autograd.gradgradcheck(gated_gelu, (y,))


def _saved_numel(fn, y: torch.Tensor) -> int:
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(y)
    return sum(saved)


def test_saves_only_the_projection() -> None:
    y = torch.randn(2, 16, 32, requires_grad=True)
    assert _saved_numel(gated_gelu, y) == y.numel()
    assert _saved_numel(_plain, y) > y.numel()  # y's halves and gelu(gate)


def test_plain_path_without_a_graph_and_under_torch_func_and_jvp() -> None:
    y = torch.randn(4, 6)
    with torch.no_grad():
        assert gated_gelu(y.requires_grad_()).grad_fn is None
    y = y.detach()
    assert gated_gelu(y).grad_fn is None
    want = torch.func.grad(lambda t: _plain(t).sum())(y)
    assert torch.equal(torch.func.grad(lambda t: gated_gelu(t).sum())(y), want)
    tangent = torch.randn_like(y)
    with fwAD.dual_level():  # a graph recorded too: forward AD still takes the plain path
        out = gated_gelu(fwAD.make_dual(y.clone().requires_grad_(), tangent))
        jvp = fwAD.unpack_dual(out).tangent
    _, want_jvp = torch.func.jvp(_plain, (y,), (tangent,))
    torch.testing.assert_close(jvp, want_jvp)


def test_geglu_module_trains_through_it() -> None:
    torch.manual_seed(0)
    geglu = GEGLU(8, 12)
    x = torch.randn(2, 5, 8)
    out = geglu(x)
    assert type(out.grad_fn).__name__ == "_GatedGeluBackward"
    out.square().sum().backward()
    grad = geglu.proj.weight.grad.clone()
    geglu.zero_grad()
    h, gate = geglu.proj(x).chunk(2, dim=-1)
    (h * F.gelu(gate)).square().sum().backward()
    assert torch.equal(grad, geglu.proj.weight.grad)
