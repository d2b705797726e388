"""Caption dropout for classifier-free guidance (Ho & Salimans 2022, Alg. 1): entry i becomes the
null condition exactly when its uniform draw u_i < ucg_rate, per embedder, from the generator."""

from __future__ import annotations

import pytest
import torch

from ldm.engine.conditioner import ZERO_KEY, Conditioner, Embedder, drop_entries


def _draws(n: int, seed: int) -> list[float]:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 1.0])
def test_drop_entries_replaces_exactly_the_draws_below_the_rate(rate: float) -> None:
    u = _draws(8, 3)
    words = [f"w{i}" for i in range(8)]
    got = drop_entries(list(words), rate, "", torch.Generator().manual_seed(3))
    assert got == ["" if u[i] < rate else words[i] for i in range(8)]
    labels = torch.arange(8.0).view(8, 1, 1) + 1
    got_t = drop_entries(labels, rate, 0, torch.Generator().manual_seed(3))
    expect = [0.0 if u[i] < rate else float(i + 1) for i in range(8)]
    assert got_t.flatten().tolist() == expect and got_t.shape == (8, 1, 1)


def test_conditioner_drop_per_embedder_in_order_and_zero_null_rows() -> None:
    text = Embedder("txt", encode=lambda x: x, ucg_rate=0.5, null="")
    label = Embedder("cls", encode=lambda x: x, kind="vector", ucg_rate=0.25, null=7)
    keep = Embedder("size", encode=lambda x: x, kind="vector", ucg_rate=0.0, null=0)
    zero = Embedder("pooled", encode=lambda x: x, kind="vector", ucg_rate=0.4, zero_null=True)
    cond = Conditioner([text, label, keep, zero])
    batch = {
        "txt": ["a", "b", "c", "d", "e", "f"],
        "cls": torch.tensor([1, 2, 3, 4, 5, 6]),
        "size": torch.tensor([9, 9, 9, 9, 9, 9]),
        "pooled": torch.ones(6, 2),
    }
    u = _draws(18, 11)  # one stream: 6 draws for txt, 6 for cls, none for size, 6 for pooled
    out = cond.drop(batch, generator=torch.Generator().manual_seed(11))
    assert out["txt"] == ["" if u[i] < 0.5 else "abcdef"[i] for i in range(6)]
    assert out["cls"].tolist() == [7 if u[6 + i] < 0.25 else i + 1 for i in range(6)]
    assert out["size"].tolist() == [9] * 6
    assert out[ZERO_KEY + "3"].tolist() == [u[12 + i] < 0.4 for i in range(6)]
    assert torch.equal(out["pooled"], torch.ones(6, 2))  # zero_null: rows zeroed in embed()
    with pytest.raises(ValueError, match="no null value"):
        Conditioner([Embedder("txt", encode=str, ucg_rate=0.1)]).drop({"txt": ["a"]})
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        Embedder("txt", encode=str, ucg_rate=1.5)
