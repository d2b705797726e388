"""The feature-major GEGLU feed-forward (ldm.modules.geglu_feed_forward) against the modules'
own composition: values, every gradient, second derivatives, what it saves, and where it stands
aside."""

import pytest
import torch
from torch import nn

from ldm.modules import geglu_feed_forward as geglu_ff
from ldm.modules.attention import FeedForward


def _ff(dim: int = 24, seed: int = 0) -> FeedForward:
    torch.manual_seed(seed)
    ff = FeedForward(dim, glu=True)
    for p in ff.parameters():
        nn.init.normal_(p, 0.0, 0.3)
    return ff


def _module_path(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    return ff.net(x)  # the modules themselves: Linear -> gated_gelu -> Dropout -> Linear


def _grads(ff: FeedForward, x: torch.Tensor, fn, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = fn(ff, x)
    out.backward(g)
    grads = [x.grad] + [p.grad for p in ff.parameters()]
    ff.zero_grad(set_to_none=True)
    return [out.detach()] + grads


def test_values_and_gradients_match_the_modules():
    ff = _ff()
    x = torch.randn(2, 37, 24)
    g = torch.randn(2, 37, 24)
    seen = []
    real = geglu_ff._GegluFeedForward.apply
    try:
        geglu_ff._GegluFeedForward.apply = lambda *a: seen.append(1) or real(*a)
        fused = _grads(ff, x, lambda m, t: m(t), g)
    finally:
        geglu_ff._GegluFeedForward.apply = real
    assert seen == [1]  # the fused function ran
    plain = _grads(ff, x, _module_path, g)
    exact = _grads(ff.double(), x.double(), _module_path, g.double())
    ff.float()
    for got, want, ref in zip(fused, plain, exact):
        scale = ref.abs().max()
        # as close to float64 as the modules' own fp32 result is
        assert (got.double() - ref).abs().max() <= 4 * (want.double() - ref).abs().max() + 1e-7
        assert (got.double() - ref).abs().max() <= 1e-5 * scale


def test_inference_equals_the_training_forward_bit_for_bit():
    ff = _ff()
    x = torch.randn(3, 11, 24)
    with torch.no_grad():
        inference = ff(x)
    training = ff(x.requires_grad_())
    assert torch.equal(inference, training.detach())
    modules = _module_path(ff, x).detach()
    assert (inference - modules).abs().max() <= 1e-6 * modules.abs().max()


@pytest.mark.parametrize("frozen", ["weights", "input"])
def test_partial_gradients(frozen):
    """Frozen weights (textual inversion, LoRA elsewhere) or a frozen input: only what needs a
    gradient gets one, equal to the modules'."""
    ff = _ff()
    x = torch.randn(2, 9, 24, requires_grad=frozen == "weights")
    for p in ff.parameters():
        p.requires_grad_(frozen == "input")
    g = torch.randn(2, 9, 24)
    ff(x).backward(g)
    got = [t.grad for t in (x, *ff.parameters())]
    for t in (x, *ff.parameters()):
        t.grad = None
    _module_path(ff, x).backward(g)
    for a, t in zip(got, (x, *ff.parameters())):
        assert (a is None) == (t.grad is None)
        if a is not None:
            torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-5)


def test_double_backward_is_exact():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(8, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = geglu_ff._GegluFeedForward.apply
    assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2))
    assert torch.autograd.gradgradcheck(fn, (x, w1, b1, w2, b2))


def test_saves_less_than_the_modules():
    """The gate's output is recomputed in the backward instead of kept for the second layer."""
    ff = _ff(dim=32)
    x = torch.randn(2, 64, 32, requires_grad=True)

    def saved(fn) -> int:
        ptrs = {p.untyped_storage().data_ptr() for p in ff.parameters()}
        ptrs.add(x.untyped_storage().data_ptr())
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(ff, x)
        return sum(n for p, n in seen.items() if p not in ptrs)

    hidden = 2 * 64 * 32 * 4 * 4  # one [rows, inner] fp32 tensor (inner = 4 * dim)
    assert saved(lambda m, t: m(t)) <= saved(_module_path) - hidden


class _Wrapped(nn.Module):  # what a PEFT LoRA layer looks like from outside
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 0.5


@pytest.mark.parametrize(
    "case", ["hook", "net_hook", "global_hook", "wrapped", "dropout", "autocast", "bf16"]
)
def test_stands_aside_where_the_modules_do_more(case, request):
    ff = _ff()
    x = torch.randn(2, 9, 24, requires_grad=True)
    calls = []
    if case == "hook":
        ff.net[2].register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    elif case == "net_hook":  # on the Sequential: the modules' own call must run
        ff.net.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    elif case == "global_hook":  # on every module: the linear layers' calls must run
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: calls.append(1) if m is ff.net[2] else None
        )
        request.addfinalizer(handle.remove)
    elif case == "wrapped":
        ff.net[0].proj = _Wrapped(ff.net[0].proj)
    elif case == "dropout":
        ff.net[1].p = 0.5
        ff.train()
    elif case == "bf16":
        ff.bfloat16()
        x = x.detach().bfloat16().requires_grad_()
    assert not geglu_ff.applies(ff.net[0].proj, ff.net[1], ff.net[2], x) or case in (
        "autocast",
        "net_hook",
    )
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        if case == "autocast":
            assert not geglu_ff.applies(ff.net[0].proj, ff.net[1], ff.net[2], x)
        got = ff(x)
        torch.manual_seed(1)
        want = _module_path(ff, x)
    assert torch.equal(got, want)
    if case in ("hook", "net_hook", "global_hook"):  # called by ff(x) and by the reference
        assert calls == [1, 1]
