"""UNetModel behaviour: checkpointing, dtypes, class conditioning, variants of the constructor."""

import pytest
import torch

from ldm.modules.unet import UNetModel
from ldm.modules.unet_layers import ResBlock

TINY = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_heads=2,
    use_spatial_transformer=True,
    context_dim=16,
    legacy=False,
)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _inputs(b=2, hw=8, ctx_dim=16):
    return torch.randn(b, 4, hw, hw), torch.tensor([10.0, 500.5])[:b], torch.randn(b, 3, ctx_dim)


@pytest.mark.parametrize("spatial", [True, False])
def test_gradient_checkpointing_gives_same_gradients(spatial, monkeypatch):
    params = dict(TINY) if spatial else dict(TINY, use_spatial_transformer=False, context_dim=None)
    plain, ckpt = UNetModel(**params), UNetModel(**params, use_checkpoint=True)
    _randomize(plain)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = _inputs()
    ctx = ctx if spatial else None
    calls = {"n": 0}
    real = ResBlock._forward

    def counting(self, *args):
        calls["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(ResBlock, "_forward", counting)
    grads = []
    for model in (plain, ckpt):
        calls["n"] = 0
        model(x, t, context=ctx).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        grads[-1]["#calls"] = calls["n"]
    n_res = sum(isinstance(m, ResBlock) for m in plain.modules())
    assert grads[0].pop("#calls") == n_res
    assert grads[1].pop("#calls") == 2 * n_res  # recomputed in backward: checkpointing is on
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_bf16_on_cpu_close_to_fp32():
    model = UNetModel(**TINY).eval()
    _randomize(model)
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, context=ctx)
        half = model.to(torch.bfloat16)(x.bfloat16(), t, context=ctx.bfloat16())
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t, context=ctx)
    assert half.dtype == torch.bfloat16 and auto.dtype == torch.bfloat16  # autocast conv output
    scale = ref.abs().max()
    for out in (half, auto):
        rel = ((out.float() - ref).abs().max() / scale).item()
        assert rel < 0.05, rel  # bf16 has an 8-bit mantissa


def test_use_bf16_runs_torso_in_bf16():
    fp32 = UNetModel(**TINY).eval()
    _randomize(fp32)
    bf16 = UNetModel(**TINY, use_bf16=True).eval()
    bf16.load_state_dict(fp32.state_dict())
    x, t, ctx = _inputs()
    seen = []
    hook = bf16.middle_block.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        ref = fp32(x, t, context=ctx)
        same = bf16(x, t, context=ctx)  # fp32 weights, no autocast: runs in fp32
        bf16.convert_to_fp16()  # guided-diffusion name; casts the torso to self.dtype
        out = bf16(x, t, context=ctx)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert torch.equal(same, ref)
    assert out.dtype == torch.float32
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.05


def test_fractional_and_scalar_timesteps():
    model = UNetModel(**TINY).eval()
    _randomize(model)
    x, _, ctx = _inputs()
    with torch.no_grad():
        a = model(x, torch.tensor([250.5, 250.5]), context=ctx)
        b = model(x, 250.5, context=ctx)
        c = model(x, torch.tensor([250, 250]), context=ctx)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-5  # t = 250.5 is not rounded to 250


@pytest.mark.parametrize(
    "num_classes, y",
    [
        (10, torch.tensor([3, 7])),
        ("continuous", torch.tensor([[0.3], [0.9]])),
        ("sequential", torch.randn(2, 6)),
    ],
)
def test_class_conditioning_adds_label_embedding(num_classes, y):
    params = dict(TINY, num_classes=num_classes, adm_in_channels=6)
    cond, uncond = UNetModel(**params).eval(), UNetModel(**TINY).eval()
    _randomize(cond)
    uncond.load_state_dict(cond.state_dict(), strict=False)
    x, t, ctx = _inputs()
    with torch.no_grad():
        out = cond(x, t, context=ctx, y=y)
        assert (out - uncond(x, t, context=ctx)).abs().max() > 1e-4
        # emb = time_embed(t) + label_emb(y): a model whose time embedding adds label_emb(y) agrees
        label = cond.label_emb(y if num_classes != "continuous" else y.float())
        handle = uncond.time_embed.register_forward_hook(lambda m, i, o: o + label)
        assert torch.allclose(uncond(x, t, context=ctx), out, atol=1e-6)
        handle.remove()
    with pytest.raises(ValueError, match="num_classes"):
        cond(x, t, context=ctx)


def test_codebook_head_predicts_ids():
    model = UNetModel(**TINY, n_embed=17)
    x, t, ctx = _inputs()
    logits = model(x, t, context=ctx)
    assert logits.shape == (2, 17, 8, 8)
    assert "id_predictor.1.weight" in model.state_dict()


@pytest.mark.parametrize("dims, shape", [(1, (2, 4, 16)), (3, (2, 4, 2, 8, 8))])
def test_1d_and_3d_unets(dims, shape):
    model = UNetModel(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[2],
        num_res_blocks=1,
        channel_mult=[1, 2],
        num_head_channels=16,
        dims=dims,
        use_new_attention_order=True,
    )
    _randomize(model)
    x = torch.randn(*shape)
    out = model(x, torch.tensor([1, 2]))
    assert out.shape == shape
    out.mean().backward()
    assert model.input_blocks[0][0].weight.grad.abs().sum() > 0


def test_scale_shift_resblock_updown_unet():
    """lsun_churches-like: AdaGN (scale-shift) ResBlocks that also resample."""
    params = dict(TINY, use_spatial_transformer=False, context_dim=None, num_heads=4)
    model = UNetModel(**params, use_scale_shift_norm=True, resblock_updown=True)
    keys = model.state_dict()
    assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)  # 2 x out_channels
    assert "input_blocks.2.0.in_layers.0.weight" in keys  # the downsampling ResBlock
    out = model(torch.randn(1, 4, 8, 8), torch.tensor([5]))
    assert out.shape == (1, 4, 8, 8)


def test_num_attention_blocks_and_disabled_self_attention():
    params = dict(TINY, attention_resolutions=[1, 2], num_res_blocks=2)
    model = UNetModel(
        **params,
        num_attention_blocks=[1, 2],
        disable_self_attentions=[True, False],
        disable_middle_self_attn=True,
    )
    keys = model.state_dict()
    assert "input_blocks.1.1.proj_in.weight" in keys
    assert "input_blocks.2.1.proj_in.weight" not in keys  # only 1 attention block at level 0
    # self-attention disabled at level 0: attn1 attends to the 16-dim context
    assert keys["input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"].shape == (32, 16)
    assert keys["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 64)
    assert keys["middle_block.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 16)
    x, t, ctx = _inputs()
    assert model(x, t, context=ctx).shape == x.shape


def test_readable_errors():
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(**dict(TINY, context_dim=None))
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetModel(**dict(TINY, num_res_blocks=[1, 1, 1]))
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel(**dict(TINY, num_heads=-1))
    with pytest.raises(ValueError, match="'sdpx'"):
        UNetModel(**TINY, attn_backend="sdpx")


@pytest.mark.parametrize(
    "variant",
    [{}, {"resblock_updown": True}, {"conv_resample": False}, {"use_checkpoint": True}],
    ids=["upsample", "resblock-updown", "avg-pool", "checkpointed"],
)
def test_sides_not_divisible_by_the_downsamplings_keep_their_size(variant):
    """A 9 x 7 latent (one downsampling: sides should be even) comes back 9 x 7, gradients too."""
    unet = UNetModel(**TINY, **variant)
    _randomize(unet)
    x = torch.randn(2, 4, 9, 7, requires_grad=True)
    out = unet(x, torch.tensor([10.0, 500.5]), context=torch.randn(2, 3, 16))
    assert out.shape == (2, 4, 9, 7)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.shape == x.shape
