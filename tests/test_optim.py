"""ldm.optim.adamw: the fused kernel where it applies, the same updates as the loop AdamW."""

import torch

from ldm.optim import adamw, can_fuse


def test_fused_on_cpu_and_same_result_as_the_loop() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused = adamw(a.parameters(), lr=1e-2, weight_decay=0.01)
    loop = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(16, 8)
    for _ in range(5):
        for net, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_not_fused_where_the_kernel_does_not_apply() -> None:
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert not can_fuse([meta]) and not can_fuse([])
    mixed = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert not can_fuse(mixed)
    assert adamw([meta], lr=1e-3).defaults.get("fused") in (None, False)
    # an explicit choice is kept
    assert (
        adamw(torch.nn.Linear(2, 2).parameters(), lr=1e-3, fused=False).defaults["fused"] is False
    )
