"""gradient_checkpointing (U-Net, text encoders) and compile: same results, same state-dict keys."""

from __future__ import annotations

import pytest
import torch
from tiny_engines import tiny_engine
from tiny_models import TINY_UNET

from ldm.engine.memory import checkpointing_options, set_unet_checkpointing
from ldm.modules import activation_recompute
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.unet import UNetModel
from ldm.modules.unet_attention import AttentionBlock
from ldm.modules.unet_layers import ResBlock
from ldm.util import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([3, 50]),
        torch.randn(2, 5, 32, generator=g),
    )


def loss_and_grads(unet: UNetModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.zero_grad()
    x, t, c = unet_inputs()
    loss = unet(x, t, context=c).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


def hf_checkpointing(model: torch.nn.Module) -> bool:
    """transformers' flag (renamed to is_activation_checkpointing in 5.x)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


@pytest.fixture
def tiny_unet() -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(**{**TINY_UNET, "dropout": 0.1}).train()  # dropout: the RNG is replayed
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # the zero-initialised outputs too
    return unet


def test_unet_checkpointing_gives_the_same_loss_and_gradients(
    tiny_unet: UNetModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(7)
    loss, grads = loss_and_grads(tiny_unet)
    n = set_unet_checkpointing(tiny_unet, True)
    kinds = (ResBlock, AttentionBlock, BasicTransformerBlock)
    assert n == sum(isinstance(m, kinds) for m in tiny_unet.modules()) > 0
    calls = []
    real = activation_recompute._torch_checkpoint
    monkeypatch.setattr(
        activation_recompute,
        "_torch_checkpoint",
        lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k),
    )
    torch.manual_seed(7)
    loss_ckpt, grads_ckpt = loss_and_grads(tiny_unet)
    assert len(calls) == n  # each block went through torch.utils.checkpoint
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=0, atol=1e-6, msg=k)
    set_unet_checkpointing(tiny_unet, False)
    calls.clear()
    loss_and_grads(tiny_unet)
    assert calls == []


def test_engine_switch_sets_the_unet_blocks() -> None:
    engine = tiny_engine(gradient_checkpointing={"unet": True})
    blocks = [m for m in engine.model.diffusion_model.modules() if isinstance(m, ResBlock)]
    assert blocks and all(b.use_checkpoint for b in blocks)
    assert not any(
        b.use_checkpoint
        for b in tiny_engine().model.diffusion_model.modules()
        if isinstance(b, ResBlock)
    )


def test_text_encoder_checkpointing_gives_the_same_gradients() -> None:
    from ldm.modules.encoders.text_transformer import CLIPTextEncoder

    torch.manual_seed(0)
    enc = CLIPTextEncoder(width=32, layers=2, heads=4, max_length=16).train()

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        enc.zero_grad()
        out = enc(["a red cube", "two spheres"]).square().mean()
        out.backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    loss, g = grads()
    enc.set_grad_checkpointing(True)
    assert hf_checkpointing(enc.transformer)
    loss_ckpt, g_ckpt = grads()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    for a, b in zip(g_ckpt, g, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    enc.set_grad_checkpointing(False)
    assert not hf_checkpointing(enc.transformer)


def test_open_clip_switch() -> None:
    from tiny_text_encoders import tiny_open_clip

    enc = tiny_open_clip()
    enc.set_grad_checkpointing(True)
    assert enc.model.transformer.grad_checkpointing is True


def test_engine_switch_reaches_a_trained_text_encoder_only() -> None:
    from tiny_models import tiny_ldm_config

    from ldm.util import instantiate_from_config

    cfg = tiny_ldm_config()
    params = cfg["model"]["params"]
    params["gradient_checkpointing"] = True
    frozen = instantiate_from_config(cfg["model"])
    assert not hf_checkpointing(frozen.cond_stage_model.transformer)
    params["cond_stage_trainable"] = True
    params["cond_stage_config"]["params"]["freeze"] = False
    trained = instantiate_from_config(cfg["model"])
    assert hf_checkpointing(trained.cond_stage_model.transformer)
    assert trained.model.diffusion_model.input_blocks[1][0].use_checkpoint


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {}),
        (False, {}),
        (True, {"unet": True, "text_encoder": True}),
        ({"unet": True}, {"unet": True}),
    ],
)
def test_checkpointing_options(value: object, expected: dict) -> None:
    assert checkpointing_options(value) == expected


def test_checkpointing_option_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"gradient_checkpointing.unett: unknown part \(did you mean 'unet'\?\)"
    ):
        checkpointing_options({"unett": True})
    with pytest.raises(ConfigError, match=r"expected true or false"):
        checkpointing_options({"unet": "yes"})


# ---------------------------------------------------------------- compile
def test_compiled_checkpoint_keys_are_unchanged_and_load_both_ways() -> None:
    compiled = tiny_engine(compile={"mode": "default", "dynamic": False})
    assert compiled.model.diffusion_model._compiled_call_impl is not None
    eager = tiny_engine(seed=3)
    keys = list(compiled.state_dict())
    assert keys == list(eager.state_dict()) and not any("_orig_mod" in k for k in keys)
    eager.load_state_dict(compiled.state_dict(), strict=True)
    compiled.load_state_dict(tiny_engine(seed=4).state_dict(), strict=True)


def test_compile_option_errors() -> None:
    with pytest.raises(ConfigError, match=r"compile.mod: unknown option \(did you mean 'mode'\?\)"):
        tiny_engine(compile={"mod": "max-autotune"})
    with pytest.raises(ConfigError, match=r"compile='yes'"):
        tiny_engine(compile="yes")


def _compiled_equals_eager(backend: str | None) -> None:
    torch.manual_seed(0)
    unet = UNetModel(**TINY_UNET).eval()
    x, t, c = unet_inputs()
    with torch.no_grad():
        ref = unet(x, t, context=c)
        unet.compile(**({"backend": backend} if backend else {}))
        out = unet(x, t, context=c)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_compiled_unet_equals_eager_through_dynamo() -> None:
    """Dynamo captures the U-Net (eager backend: seconds); the inductor test below is slow."""
    torch._dynamo.reset()
    _compiled_equals_eager("eager")


@pytest.mark.slow
def test_compiled_unet_equals_eager_with_inductor() -> None:
    """About 2 minutes of compilation on 2 CPU cores (seconds with a warm inductor cache)."""
    torch._dynamo.reset()
    _compiled_equals_eager(None)
