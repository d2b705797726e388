"""LitEma and the checkpoint EMA helpers against numbers written out by hand (CompVis LitEma:
d_n = min(decay, (1 + n) / (10 + n)), shadow <- shadow - (1 - d_n) (shadow - param))."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ldm.checkpoint.ema import apply_ema, ema_key, has_ema, make_ema_entries, strip_ema
from ldm.ema import LitEma, shadow_name


class Two(nn.Module):
    """w: trained, [2]; frozen: not trained; sub.b: trained, nested name."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.ones(1, dtype=torch.float64), requires_grad=False)
        self.sub = nn.Module()
        self.sub.b = nn.Parameter(torch.tensor([4.0], dtype=torch.float64))


def set_(p: torch.Tensor, values: list[float]) -> None:
    with torch.no_grad():
        p.copy_(torch.tensor(values, dtype=p.dtype))


def test_three_updates_by_hand() -> None:
    model = Two()
    ema = LitEma(model, decay=0.9)
    assert sorted(n for n, _ in ema.named_buffers()) == ["decay", "num_updates", "subb", "w"]
    assert ema.m_name2s_name == {"w": "w", "sub.b": "subb"}
    assert float(ema.decay) == pytest.approx(0.9) and ema.decay.dtype == torch.float32
    assert int(ema.num_updates) == 0 and ema.num_updates.dtype == torch.int32
    assert ema.collected_params == []
    set_(model.w, [1.0, 2.0])
    set_(model.frozen, [50.0])
    ema(model)  # n = 1: d = 2 / 11, shadow = 0 + (9 / 11) * w
    torch.testing.assert_close(ema.w, torch.tensor([9 / 11, 18 / 11], dtype=torch.float64))
    torch.testing.assert_close(ema.subb, torch.tensor([4.0], dtype=torch.float64))
    set_(model.w, [3.0, 3.0])
    set_(model.sub.b, [0.0])
    ema(model)  # n = 2: d = 3 / 12 = 1 / 4
    e2 = [9 / 44 + 9 / 4, 18 / 44 + 9 / 4]
    torch.testing.assert_close(ema.w, torch.tensor(e2, dtype=torch.float64))
    torch.testing.assert_close(ema.subb, torch.tensor([1.0], dtype=torch.float64))
    ema(model)  # n = 3: d = 4 / 13
    e3 = [4 / 13 * e + 9 / 13 * 3 for e in e2]
    torch.testing.assert_close(ema.w, torch.tensor(e3, dtype=torch.float64))
    torch.testing.assert_close(ema.subb, torch.tensor([4 / 13 * 1.0], dtype=torch.float64))
    assert int(ema.num_updates) == 3
    assert model.frozen.item() == 50.0 and not hasattr(ema, "frozen")
    # copy_to writes the shadows into the trained parameters only
    ema.copy_to(model)
    torch.testing.assert_close(model.w.detach(), torch.tensor(e3, dtype=torch.float64))
    assert model.frozen.item() == 50.0


def test_decay_after_warm_up_and_without_it() -> None:
    model = Two()
    ema = LitEma(model, decay=0.5)
    ema.num_updates.fill_(100)  # (1 + 101) / (110) > 0.5: the decay itself
    set_(model.w, [2.0, 4.0])
    ema(model)
    torch.testing.assert_close(ema.w, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert int(ema.num_updates) == 101
    fixed = LitEma(Two(), decay=0.75, use_num_upates=False)
    assert int(fixed.num_updates) == -1
    assert fixed.current_decay() == 0.75 and fixed.current_decay(2) == 0.75**2
    set_(model.w, [4.0, 8.0])
    fixed(model)  # shadow 0 -> 0.25 * w
    torch.testing.assert_close(fixed.w, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert int(fixed.num_updates) == -1
    # decay 0 and 1 are allowed; 1 keeps the shadow, 0 copies the parameters
    assert LitEma(Two(), decay=1.0, use_num_upates=False).current_decay() == 1.0
    zero = LitEma(Two(), decay=0.0)
    zero(model)
    torch.testing.assert_close(zero.w, torch.tensor([4.0, 8.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="decay"):
        LitEma(Two(), decay=-0.1)


def test_current_decay_counts_the_next_steps() -> None:
    ema = LitEma(Two(), decay=0.99)
    assert ema.current_decay() == pytest.approx(2 / 11)
    assert ema.current_decay(3) == pytest.approx((4 / 13) ** 3)
    ema.num_updates.fill_(5)
    assert ema.current_decay(1) == pytest.approx(7 / 16)
    ema.num_updates.fill_(10_000)
    assert ema.current_decay(2) == pytest.approx(0.99**2)
    ema.reset_num_updates()
    assert int(ema.num_updates) == 0 and ema.num_updates.dtype == torch.int32


def test_every_validation_and_counting_calls() -> None:
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="every must be a positive integer"):
            LitEma(Two(), every=bad)
    model = Two()
    ema = LitEma(model, decay=0.5, use_num_upates=False, every=2)
    assert ema.every == 2 and ema.pinned_device is None
    set_(model.w, [4.0, 4.0])
    # calls counted here: updates at the 2nd and 4th call
    assert [ema.after_step(model) for _ in range(4)] == [False, True, False, True]
    s1 = 4 * (1 - 0.25)  # one update with d = 0.5 ** 2
    s2 = s1 - (1 - 0.25) * (s1 - 4)
    torch.testing.assert_close(ema.w, torch.tensor([s2, s2], dtype=torch.float64))
    # a given step number: the phase follows it, and step 0 updates (0 % N == 0)
    other = LitEma(model, decay=0.5, use_num_upates=False, every=2)
    assert other.after_step(model, 0) is True
    assert other.after_step(model, 0) is False
    # counted calls are numbered 1, 2, 3 like the trainer's steps: step 3 given after the 3rd
    # counted call is the same step, not updated twice
    third = LitEma(model, decay=0.5, use_num_upates=False, every=3)
    assert [third.after_step(model) for _ in range(3)] + [third.after_step(model, 3)] == [
        False,
        False,
        True,
        False,
    ]
    one = LitEma(model, decay=0.5, use_num_upates=False)
    assert one.after_step(model) is True and one.after_step(model, 7) is True


def test_forward_with_another_parameter_set_raises_and_dtype_follows() -> None:
    ema = LitEma(Two(), decay=0.5, use_num_upates=False)
    other = nn.Linear(1, 1)
    with pytest.raises(KeyError, match="has no shadow copy"):
        ema(other)
    model = Two().float()
    ema = LitEma(Two(), decay=0.5, use_num_upates=False)  # float64 shadows
    set_(model.w, [2.0, 2.0])
    ema(model)
    assert ema.w.dtype == torch.float32
    torch.testing.assert_close(ema.w, torch.tensor([1.0, 1.0]))


def test_duplicate_shadow_names_are_rejected() -> None:
    model = nn.Module()
    model.ab = nn.Parameter(torch.zeros(1))
    model.a = nn.Module()
    model.a.b = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="same shadow name 'ab'"):
        LitEma(model)
    assert shadow_name("x.y.z") == "xyz"


def test_drop_untrained_forgets_frozen_shadows() -> None:
    model = Two()
    ema = LitEma(model)
    model.sub.b.requires_grad_(False)
    assert ema.drop_untrained(model) == ["sub.b"]
    assert ema.m_name2s_name == {"w": "w"} and not hasattr(ema, "subb")
    assert "subb" not in ema.state_dict()
    ema(model)  # the frozen one is skipped, no KeyError
    assert ema.drop_untrained(model) == []


def test_pinned_shadow_is_a_copy_and_keeps_its_dtype() -> None:
    model = Two()
    ema = LitEma(model, decay=0.5, use_num_upates=False, device="cpu")
    assert ema.pinned_device == torch.device("cpu")
    set_(model.w, [8.0, 8.0])  # the shadow does not alias the parameter
    torch.testing.assert_close(ema.w, torch.zeros(2, dtype=torch.float64))
    ema.store(model.parameters())
    set_(model.w, [0.0, 0.0])
    assert ema.collected_params[0].tolist() == [8.0, 8.0]  # store copies too
    ema.restore(model.parameters())
    assert model.w.tolist() == [8.0, 8.0] and ema.collected_params == []
    ema.w.data = ema.w.data.float()
    ema(model)  # pinned: the parameter is cast to the shadow's dtype
    assert ema.w.dtype == torch.float32
    torch.testing.assert_close(ema.w, torch.tensor([4.0, 4.0]))


def test_meta_model_with_a_pinned_ema_stays_meta() -> None:
    with torch.device("meta"):
        model = Two()
        ema = LitEma(model, device="cpu")
    assert ema.w.device.type == "meta" and ema.decay.device.type == "meta"


def test_store_restore_unpinned_and_length_mismatch() -> None:
    model = Two()
    ema = LitEma(model)
    set_(model.w, [1.0, 2.0])
    ema.store(model.parameters())
    set_(model.w, [5.0, 5.0])
    assert ema.collected_params[0].tolist() == [1.0, 2.0]
    ema.restore(model.parameters())
    assert model.w.tolist() == [1.0, 2.0]
    ema.store([model.w])
    with pytest.raises(ValueError):
        ema.restore(model.parameters())  # more parameters than were stored


# -- checkpoint helpers


def test_ema_key_has_ema_and_strip() -> None:
    assert ema_key("model.diffusion_model.out.2.weight") == "model_ema.diffusion_modelout2weight"
    with pytest.raises(ValueError, match="only `model.\\*`"):
        ema_key("first_stage_model.x")
    meta = {"model_ema.decay": torch.tensor(0.9), "model_ema.num_updates": torch.tensor(0)}
    assert not has_ema(meta) and not has_ema({"model.a": torch.ones(1)})
    assert has_ema({**meta, "model_ema.a": torch.ones(1)})
    sd = {**meta, "model_ema.a": torch.ones(1), "model.a": torch.zeros(1), "cond.x": torch.ones(1)}
    assert sorted(strip_ema(sd)) == ["cond.x", "model.a"]


def test_apply_ema_replaces_model_weights(caplog: pytest.LogCaptureFixture) -> None:
    sd = {
        "cond.x": torch.full((1,), 3.0),  # a non-model key first: the loop goes on past it
        "model.a.w": torch.zeros(2),
        "model.b": torch.zeros(1),
        "model.c": torch.zeros(1),
        "model_ema.aw": torch.ones(2),
        "model_ema.b": torch.full((1,), 2.0),
        "model_ema.decay": torch.tensor(0.9),
    }
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint.ema"):
        out = apply_ema(sd)
    assert sorted(out) == ["cond.x", "model.a.w", "model.b", "model.c"]
    assert out["model.a.w"].tolist() == [1.0, 1.0] and out["model.b"].tolist() == [2.0]
    assert out["model.c"].tolist() == [0.0] and out["cond.x"].tolist() == [3.0]
    assert "Using EMA weights for 2 parameter(s)." in caplog.text
    assert "1 `model.*` weight(s) have no EMA copy (e.g. ['model.c'])" in caplog.text
    with pytest.raises(KeyError, match="1 `model.\\*` weight"):
        apply_ema(sd, strict=True)
    full = {k: v for k, v in sd.items() if k != "model.c"}
    assert apply_ema(full, strict=True)["model.b"].tolist() == [2.0]
    with pytest.raises(ValueError, match="has shape \\[3\\], but model.b has \\[1\\]"):
        apply_ema({**sd, "model_ema.b": torch.ones(3)})
    caplog.clear()
    many = {f"model.p{i}": torch.zeros(1) for i in range(5)}
    with caplog.at_level(logging.WARNING, logger="ldm.checkpoint.ema"):
        apply_ema(many)
    assert "5 `model.*` weight(s) have no EMA copy (e.g. ['model.p0', 'model.p1', 'model.p2'])" in (
        caplog.text
    )


def test_make_ema_entries() -> None:
    sd = {
        "model.a.w": torch.ones(2),
        "model.steps": torch.tensor([1, 2]),
        "cond.x": torch.ones(1),
    }
    out = make_ema_entries(sd, decay=0.5)
    assert sorted(out) == ["model_ema.aw", "model_ema.decay", "model_ema.num_updates"]
    assert out["model_ema.aw"].tolist() == [1.0, 1.0]
    assert out["model_ema.aw"].data_ptr() != sd["model.a.w"].data_ptr()  # a copy
    assert out["model_ema.decay"].item() == 0.5 and out["model_ema.decay"].dtype == torch.float32
    assert out["model_ema.num_updates"].item() == 0
    assert out["model_ema.num_updates"].dtype == torch.int32
    assert make_ema_entries({})["model_ema.decay"].item() == pytest.approx(0.9999)


def test_decay_is_float32_whatever_the_default_dtype() -> None:
    """SD checkpoints hold a float32 `model_ema.decay`, also when built under float64 defaults."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert LitEma(Two()).decay.dtype == torch.float32
        assert make_ema_entries({})["model_ema.decay"].dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


def test_reset_num_updates_keeps_the_device() -> None:
    with torch.device("meta"):
        ema = LitEma(Two())
    ema.reset_num_updates()
    assert ema.num_updates.device.type == "meta" and ema.num_updates.dtype == torch.int32
