"""PackedLinear (pre-packed GEMM weights for CPU inference) and the shared weight cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.packed_linear import MKL_MIN_ELEMENTS, PackedLinear
from ldm.modules.weight_cache import DerivedWeights, env_switch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("rows", [1, 7, 154, 300])
def test_fp32_packed_equals_f_linear_for_any_row_count(rows: int) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(1024, 1024), torch.randn(1024)  # above MKL_MIN_ELEMENTS
    assert w.numel() >= MKL_MIN_ELEMENTS
    lin = PackedLinear(w, b)
    if torch.backends.mkl.is_available():
        assert lin.kind == "mkl"
        assert lin.nbytes() > 0  # the packed copy
    x = torch.randn(2, rows, 1024)
    exact = F.linear(x.double(), w.double(), b.double())
    out = lin(x)
    assert out.shape == (2, rows, 1024)
    assert _rel(out, exact) < 2e-6


def test_bf16_packed_equals_f_linear() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(256, 128).bfloat16(), torch.randn(256).bfloat16()
    lin = PackedLinear(w, b)
    x = torch.randn(5, 128).bfloat16()
    assert lin(x).dtype == torch.bfloat16
    assert _rel(lin(x), F.linear(x, w, b)) < 1e-2


def test_small_fp32_and_fp16_weights_stay_plain_and_bit_identical() -> None:
    w, b = torch.randn(64, 32), torch.randn(64)
    lin = PackedLinear(w, b)
    assert lin.kind == "plain" and lin.nbytes() == 0
    x = torch.randn(3, 32)
    assert torch.equal(lin(x), F.linear(x, w, b))
    half = PackedLinear(w.half(), None)
    assert half.kind == "plain"


def test_owned_weight_is_freed_once_packed_and_wrong_inputs_are_named() -> None:
    w = torch.randn(1024, 1024)
    lin = PackedLinear(w.clone(), None, owns_weight=True)
    if lin.kind == "plain":
        pytest.skip("this build has no MKL")
    assert lin.weight.stride() == (0, 0)  # only the packed copy is held
    with pytest.raises(ValueError, match="packed as torch.float32"):
        lin(torch.randn(2, 1024).bfloat16())


def test_derived_weights_rebuild_on_every_kind_of_edit() -> None:
    cache = DerivedWeights(probe_size=64)
    owner = nn.Linear(256, 256)
    builds = []

    def get() -> torch.Tensor:
        return cache.get(
            owner,
            (owner.weight,),
            "t",
            lambda: builds.append(1) or owner.weight.detach() * 2,
            unprobed=(owner.bias,),
        )

    first = get()
    assert get() is first and len(builds) == 1
    with torch.no_grad():
        owner.weight.add_(1.0)  # version counter
    assert torch.equal(get(), owner.weight.detach() * 2)
    owner.weight.data.mul_(3.0)  # through .data: the probe
    assert torch.equal(get(), owner.weight.detach() * 2)
    with torch.no_grad():
        owner.bias.add_(1.0)  # an unprobed tensor's version
    get()
    assert len(builds) == 4
    assert cache.nbytes() == 256 * 256 * 4
    cache.drop(owner)
    assert len(cache) == 0


def test_env_switch_words(monkeypatch) -> None:
    for word, on in (("0", False), ("off", False), ("1", True), ("yes", True), ("", True)):
        monkeypatch.setenv("LDM_TEST_SWITCH", word)
        assert env_switch("LDM_TEST_SWITCH", off="a", on="b") is on
    monkeypatch.delenv("LDM_TEST_SWITCH")
    assert env_switch("LDM_TEST_SWITCH", off="a", on="b")
    monkeypatch.setenv("LDM_TEST_SWITCH", "perhaps")
    with pytest.raises(ValueError, match=r"LDM_TEST_SWITCH='perhaps' is not a switch.*0 \(a\)"):
        env_switch("LDM_TEST_SWITCH", off="a", on="b")
