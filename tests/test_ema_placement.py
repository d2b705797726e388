"""ema_device (the EMA in host memory) and ema_every (every N steps with decay**N)."""

from __future__ import annotations

import pytest
import torch
from tiny_engines import tiny_engine, train_steps
from torch import nn

from ldm.ema import LitEma
from ldm.util import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def ema_state(engine) -> dict[str, torch.Tensor]:
    return {k: v for k, v in engine.state_dict().items() if k.startswith("model_ema.")}


def test_cpu_ema_every_step_equals_the_default_bit_for_bit() -> None:
    default = tiny_engine(use_ema=True, ema_decay=0.9)
    on_cpu = tiny_engine(use_ema=True, ema_decay=0.9, ema_device="cpu", ema_every=1)
    assert on_cpu.model_ema.pinned_device == torch.device("cpu")
    losses = [train_steps(m, 4) for m in (default, on_cpu)]
    assert losses[0] == losses[1]
    a, b = ema_state(default), ema_state(on_cpu)
    assert a.keys() == b.keys() and int(a["model_ema.num_updates"]) == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the EMA moved away from the start: the comparison is not trivial
    start = tiny_engine(use_ema=True, ema_decay=0.9)
    assert not torch.equal(
        ema_state(start)["model_ema.diffusion_modelout2weight"],
        a["model_ema.diffusion_modelout2weight"],
    )


def test_every_n_updates_every_n_steps_with_decay_to_the_n() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = LitEma(model, decay=0.99, every=3)
    shadow = model.weight.detach().clone()
    for step in range(1, 10):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        updated = ema.after_step(model)
        assert updated == (step % 3 == 0)
        if updated:
            d = min(0.99, (1 + step) / (10 + step)) ** 3  # warm-up over steps, then ** N
            shadow = shadow - (1 - d) * (shadow - model.weight.detach())
        torch.testing.assert_close(ema.weight, shadow, rtol=0, atol=0)
    assert int(ema.num_updates) == 9  # counts optimizer steps


def test_every_n_follows_the_trainer_step_and_updates_once_per_step() -> None:
    model = nn.Linear(2, 2)
    ema = LitEma(model, decay=0.5, use_num_upates=False, every=2)
    start = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    # gradient accumulation: several batches end at global step 1, then 2
    assert [ema.after_step(model, s) for s in (1, 1, 2, 2, 3)] == [False, False, True, False, False]
    torch.testing.assert_close(ema.weight, start + (1 - 0.5**2))


def test_engine_ema_every() -> None:
    engine = tiny_engine(use_ema=True, ema_decay=0.9, ema_every=2)
    before = ema_state(engine)["model_ema.diffusion_modelout2weight"].clone()
    train_steps(engine, 1)
    assert torch.equal(ema_state(engine)["model_ema.diffusion_modelout2weight"], before)
    train_steps(engine, 1)
    after = ema_state(engine)
    assert not torch.equal(after["model_ema.diffusion_modelout2weight"], before)
    assert int(after["model_ema.num_updates"]) == 2


def test_pinned_ema_stays_in_host_memory_and_float32() -> None:
    engine = tiny_engine(use_ema=True, ema_device="cpu")
    engine.to(torch.float64)
    assert engine.model.diffusion_model.out[2].weight.dtype == torch.float64
    assert {b.dtype for n, b in engine.model_ema.named_buffers() if n not in ("num_updates",)} == {
        torch.float32
    }
    engine.to("meta")  # any other device: the shadow does not follow
    assert {b.device.type for b in engine.model_ema.buffers()} == {"cpu"}
    default = tiny_engine(use_ema=True)
    default.to(torch.float64)
    assert default.model_ema.diffusion_modelout2weight.dtype == torch.float64  # as before


def test_ema_scope_with_a_pinned_ema_and_another_dtype() -> None:
    engine = tiny_engine(use_ema=True, ema_device="cpu", ema_decay=0.5)
    train_steps(engine, 2)
    engine.to(torch.float64)
    weight = engine.model.diffusion_model.out[2].weight
    trained = weight.detach().clone()
    shadow = engine.model_ema.diffusion_modelout2weight
    with engine.ema_scope():
        assert weight.dtype == torch.float64
        torch.testing.assert_close(weight, shadow.double(), rtol=0, atol=0)
        assert {t.device.type for t in engine.model_ema.collected_params} == {"cpu"}
    assert torch.equal(weight, trained)


@pytest.mark.parametrize("saved_on_cpu", [True, False])
def test_checkpoints_load_across_ema_devices(saved_on_cpu: bool) -> None:
    src = tiny_engine(use_ema=True, ema_device="cpu" if saved_on_cpu else None, ema_decay=0.9)
    train_steps(src, 2)
    dst = tiny_engine(seed=5, use_ema=True, ema_device=None if saved_on_cpu else "cpu")
    state = src.state_dict()
    assert sorted(state) == sorted(dst.state_dict())
    dst.load_state_dict(state, strict=True)
    for k, v in ema_state(dst).items():
        assert torch.equal(v, state[k]), k


def test_ddp_leaves_a_pinned_ema_alone() -> None:
    engine = tiny_engine(use_ema=True, ema_device="cpu")
    ignored = set(engine._ddp_params_and_buffers_to_ignore)
    assert ignored == {"model_ema." + n for n, _ in engine.model_ema.named_buffers()}
    assert "model_ema.num_updates" in ignored
    assert not hasattr(tiny_engine(use_ema=True), "_ddp_params_and_buffers_to_ignore")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ema_device": "cuda"}, r"ema_device='cuda': expected 'cpu'"),
        ({"ema_every": 0}, r"ema_every=0: expected a positive integer"),
        ({"ema_every": 2.5}, r"ema_every=2.5"),
    ],
)
def test_errors(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_engine(use_ema=True, **params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_ema_with_the_model_on_cuda() -> None:
    engine = tiny_engine(use_ema=True, ema_device="cpu", ema_decay=0.5).cuda()
    assert {b.device.type for b in engine.model_ema.buffers()} == {"cpu"}
    opt = engine.configure_optimizers()
    batch = {"image": torch.rand(2, 8, 8, 4, device="cuda") * 2 - 1}
    for i in range(2):
        opt.zero_grad()
        engine.training_step(batch, i).backward()
        opt.step()
        engine.on_train_batch_end(None, None, i)
    weight = engine.model.diffusion_model.out[2].weight
    trained = weight.detach().clone()
    with engine.ema_scope():
        torch.testing.assert_close(weight.cpu(), engine.model_ema.diffusion_modelout2weight)
    assert torch.equal(weight, trained)
