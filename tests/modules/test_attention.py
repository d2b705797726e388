"""Attention backends agree with each other and with the closed-form softmax(q k^T / sqrt(d)) v."""

import logging

import pytest
import torch

import ldm.modules.attention_backends as backends
from ldm.modules.attention import CrossAttention, SpatialTransformer, attention
from ldm.modules.unet_attention import AttentionBlock, QKVAttention, QKVAttentionLegacy


def _reference(q, k, v, mask=None):
    """Eq. 1 of Vaswani et al. in float64."""
    q, k, v = q.double(), k.double(), v.double()
    sim = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        sim = sim.masked_fill(~mask, float("-inf"))
    return (sim.softmax(-1) @ v).float()


def _qkv(b=2, h=3, n=37, m=11, d=16):
    return torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, d)


def _spy_sdpa(monkeypatch, record):
    """Record ``record(q, k, v)`` per call of PyTorch's kernel from ``attention``."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(q, k, v, attn_mask=None, scale=None):
        seen.append(record(q, k, v))
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(backends.F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("backend", ["sdpa", "math", "xformers"])
def test_backends_match_closed_form(backend):
    q, k, v = _qkv()
    out = attention(q, k, v, backend=backend)
    assert (out - _reference(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("slice_size", [1, 5, 36, 37, 1000])
def test_sliced_math_equals_unsliced(slice_size):
    q, k, v = _qkv(n=37)
    sliced = attention(q, k, v, backend="math", slice_size=slice_size)
    assert (sliced - attention(q, k, v, backend="sdpa")).abs().max() <= 1e-5


def test_slice_env_var_limits_score_matrix(monkeypatch):
    """With LDM_ATTENTION_SLICE the math backend never builds the full N x M score matrix."""
    monkeypatch.setenv("LDM_ATTENTION_SLICE", "8")
    q, k, v = _qkv(n=64, m=64)
    seen = []
    real_softmax = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        seen.append(tuple(self.shape))
        return real_softmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    out = attention(q, k, v, backend="math")
    monkeypatch.undo()
    assert seen and all(s[-2] == 8 for s in seen) and len(seen) == 8
    assert (out - _reference(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_boolean_key_mask(backend):
    q, k, v = _qkv(m=9)
    mask = torch.rand(2, 1, 1, 9) > 0.3
    mask[..., 0] = True  # every query attends to at least one key
    out = attention(q, k, v, backend=backend, mask=mask)
    assert (out - _reference(q, k, v, mask)).abs().max() <= 1e-5


def test_env_var_selects_backend(monkeypatch):
    calls = []
    real = backends.math_attention
    monkeypatch.setattr(
        backends, "math_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    q, k, v = _qkv()
    monkeypatch.setenv("LDM_ATTENTION_BACKEND", "math")
    attention(q, k, v)
    assert calls == [1]
    attention(q, k, v, backend="sdpa")  # an explicit choice wins over the environment
    assert calls == [1]
    monkeypatch.setenv("LDM_ATTENTION_BACKEND", "flash9")
    with pytest.raises(ValueError, match="flash9.*sdpa"):
        attention(q, k, v)


def test_bad_backend_in_config_fails_at_construction():
    with pytest.raises(ValueError, match="'sdpaa'"):
        SpatialTransformer(32, 2, 16, context_dim=8, attn_backend="sdpaa")


def test_xformers_falls_back_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        out1 = attention(q, k, v, backend="xformers")
        out2 = attention(q, k, v, backend="xformers")
    assert len([r for r in caplog.records if "xformers" in r.getMessage()]) == 1
    assert torch.equal(out1, out2)
    assert (out1 - _reference(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_softmax_is_upcast(dtype):
    """Large logits overflow/lose precision in half; the math backend softmaxes in fp32."""
    q, k, v = _qkv(d=64)
    q = q * 12  # logits of order 100: exp() overflows fp16, bf16 rounding is coarse
    ref = _reference(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float())
    for backend in ("math", "sdpa"):
        out = attention(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() <= 0.05, backend


def test_cross_attention_matches_manual_heads():
    attn = CrossAttention(query_dim=24, context_dim=10, heads=3, dim_head=8)
    x, ctx = torch.randn(2, 7, 24), torch.randn(2, 5, 10)
    out = attn(x, ctx)
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    heads = []
    for i in range(3):
        s = slice(8 * i, 8 * i + 8)
        heads.append(_reference(q[None, ..., s], k[None, ..., s], v[None, ..., s])[0])
    expected = attn.to_out(torch.cat(heads, dim=-1))
    assert (out - expected).abs().max() <= 1e-5


def test_qkv_layouts_are_permutations_of_each_other():
    """Legacy layout [H, (q,k,v), C] and new layout [(q,k,v), H, C] give the same attention."""
    b, h, c, t = 2, 4, 8, 10
    qkv_new = torch.randn(b, 3 * h * c, t)
    qkv_legacy = qkv_new.reshape(b, 3, h, c, t).transpose(1, 2).reshape(b, 3 * h * c, t)
    new, legacy = QKVAttention(h)(qkv_new), QKVAttentionLegacy(h)(qkv_legacy)
    assert (new - legacy).abs().max() <= 1e-6
    q, k, v = qkv_new.reshape(b, 3, h, c, t).transpose(-1, -2).unbind(1)
    expected = _reference(q, k, v).transpose(-1, -2).reshape(b, h * c, t)
    assert (new - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_backends_agree(use_linear):
    kw = dict(in_channels=64, n_heads=4, d_head=16, depth=2, context_dim=12, use_linear=use_linear)
    models = {name: SpatialTransformer(**kw, attn_backend=name) for name in ("sdpa", "math")}
    models["math"].load_state_dict(models["sdpa"].state_dict())
    for p in models["sdpa"].proj_out.parameters():
        torch.nn.init.normal_(p)  # zero init would make the block an identity
    models["math"].load_state_dict(models["sdpa"].state_dict())
    x, ctx = torch.randn(2, 64, 6, 5), torch.randn(2, 7, 12)
    out = {name: m(x, ctx) for name, m in models.items()}
    assert (out["sdpa"] - x).abs().max() > 1e-2
    assert (out["sdpa"] - out["math"]).abs().max() <= 1e-5


def test_attention_block_backends_agree():
    blocks = [AttentionBlock(64, num_head_channels=16, attn_backend=b) for b in ("sdpa", "math")]
    torch.nn.init.normal_(blocks[0].proj_out.weight, std=0.1)
    blocks[1].load_state_dict(blocks[0].state_dict())
    x = torch.randn(2, 64, 4, 4)
    a, b = (blk(x) for blk in blocks)
    assert (a - x).abs().max() > 1e-2
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_xformers_on_cuda_matches_sdpa(dtype):
    if backends._xformers_ops() is None:
        pytest.skip("xformers is not installed")
    device = torch.accelerator.current_accelerator()
    q, k, v = (t.to(device, dtype) for t in _qkv(d=64))
    ref = _reference(q.float(), k.float(), v.float())
    for backend in ("xformers", "sdpa", "math"):
        out = attention(q, k, v, backend=backend).float()
        assert (out - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 5e-3), backend


def _fp32_attention(q, k, v, mask=None):
    """The same attention computed in fp32 and rounded once to the inputs' dtype."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask
    )
    return out.to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_half_attention_with_grad_runs_in_fp32_on_cpu(dtype):
    """A recorded half-precision graph of small attention is computed in fp32 on the CPU (its
    half-precision backward is several times slower there): values and gradients are those of
    fp32 attention rounded once, closer to float64 than the half-precision kernel's."""
    torch.manual_seed(0)
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(b=16, h=2, n=64, m=16, d=32))
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would cast fp32 back to bf16
        out = attention(q, k, v, backend="sdpa")
    assert out.dtype == dtype
    expected = _fp32_attention(*ref_inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    for got, want in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
    exact = _reference(*(t.detach() for t in (q, k, v)))
    half_kernel = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    assert (out.float() - exact).abs().max() <= (half_kernel - exact).abs().max()
    # an additive float mask goes along in fp32
    mask = torch.zeros(64, 16, dtype=dtype)
    mask[:, -3:] = -1e4
    masked = attention(q, k, v, backend="sdpa", mask=mask)
    torch.testing.assert_close(masked, _fp32_attention(q, k, v, mask.float()), rtol=0, atol=0)


@pytest.mark.parametrize("native", [True, False])
def test_half_attention_keeps_its_kernel_for_inference_and_large_sizes(monkeypatch, native):
    """Inference keeps the half kernel; above the size limit a differentiated half attention keeps
    it only where the CPU multiplies bf16 natively (elsewhere the half kernel is emulated)."""
    monkeypatch.setattr(backends, "native_half_matmul", lambda dtype: native)
    torch.manual_seed(0)
    q, k, v = (t.bfloat16() for t in _qkv(b=2, h=2, n=64, m=16, d=32))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():  # inference: the half-precision kernel, untouched
        torch.testing.assert_close(attention(q, k, v), sdpa(q, k, v), rtol=0, atol=0)
    q.requires_grad_()
    assert backends._upcast_for_cpu_backward(q, k, v)
    n = backends.CPU_HALF_BACKWARD_UPCAST_MAX // (16 * 32) + 1  # just above the limit
    big_q = torch.randn(1, 1, n, 32, dtype=torch.bfloat16, requires_grad=True)
    assert backends._upcast_for_cpu_backward(big_q, k[:1, :1], v[:1, :1]) == (not native)
    got = attention(big_q, k[:1, :1], v[:1, :1])
    if native:
        want = sdpa(big_q, k[:1, :1], v[:1, :1])
    else:
        want = sdpa(*(t.float() for t in (big_q, k[:1, :1], v[:1, :1]))).bfloat16()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setattr(backends, "CPU_HALF_BACKWARD_IN_FP32", False)  # the switch: half kernel
    assert not backends._upcast_for_cpu_backward(q, k, v)
    monkeypatch.undo()
    assert not backends._upcast_for_cpu_backward(q.float(), k.float(), v.float())  # fp32 as is
    assert not backends._upcast_for_cpu_backward(q.to("meta"), k.to("meta"), v.to("meta"))


def test_short_contexts_pad_keys_to_a_multiple_of_16(monkeypatch):
    """fp32 CPU attention over 77 keys (SD's text context) runs PyTorch's kernel on 80 keys, the
    3 padded ones masked out: the same values and gradients as the unpadded attention (float64
    reference), and k / v gradients of the real keys only. 50 keys (remainder 2), a given mask,
    few queries and bf16 stay unpadded."""
    seen = _spy_sdpa(monkeypatch, lambda q, k, v: k.shape[-2])
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, n=256, m=77, d=8))
    out = attention(q, k, v, backend="sdpa")
    assert seen == [80]
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.softmax(ref_inputs[0] @ ref_inputs[1].transpose(-1, -2) / 8**0.5, -1)
    ref = ref @ ref_inputs[2]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    for got, want in zip((q, k, v), ref_inputs):
        assert got.grad.shape == want.shape
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=2e-5)
    seen.clear()
    q2, k2, v2 = _qkv(b=1, h=2, n=256, m=50, d=8)
    attention(q2, k2, v2, backend="sdpa")
    attention(q, k, v, backend="sdpa", mask=torch.ones(1, 1, 1, 77, dtype=torch.bool))
    attention(q[:, :, :100], k, v, backend="sdpa")
    with torch.no_grad():
        attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="sdpa")
    assert seen == [50, 77, 77, 77]


def _spy_contiguity(monkeypatch) -> list[bool]:
    """Record, per call of PyTorch's kernel, whether q, k and v all arrived contiguous."""
    return _spy_sdpa(monkeypatch, lambda q, k, v: all(t.is_contiguous() for t in (q, k, v)))


def _check_against_float64(flat, views, out, d):
    """out = attention(*views(flat)) against float64 attention, values and gradients of flat."""
    ref_inputs = [t.detach().double().requires_grad_() for t in flat]
    rq, rk, rv = views(ref_inputs)
    ref = torch.softmax(rq @ rk.transpose(-1, -2) / d**0.5, -1) @ rv
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    for got, want in zip(flat, ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=2e-5)


def test_long_self_attention_runs_on_contiguous_heads(monkeypatch):
    """fp32 CPU self-attention over at least ``CONTIGUOUS_MIN_TOKENS`` tokens, given as the
    head-split views of a [B, N, H * d] projection, reaches PyTorch's kernel as contiguous
    [B, H, N, d] tensors, with the values and the gradients (back in the projection's layout) of
    the float64 reference; shorter sequences and bf16 keep the views."""
    monkeypatch.setattr(backends, "CONTIGUOUS_MIN_TOKENS", 64)
    seen = _spy_contiguity(monkeypatch)
    torch.manual_seed(0)
    b, n, h, d = 2, 64, 3, 8
    flat = [torch.randn(b, n, h * d, requires_grad=True) for _ in range(3)]

    def views(ts):
        return [t.view(b, n, h, d).transpose(1, 2) for t in ts]

    q, k, v = views(flat)
    out = attention(q, k, v, backend="sdpa")
    assert seen == [True]
    _check_against_float64(flat, views, out, d)
    seen.clear()
    with torch.no_grad():
        attention(q[:, :, :63], k[:, :, :63], v[:, :, :63], backend="sdpa")
        attention(q, k[:, :, :63], v[:, :, :63], backend="sdpa")
        attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="sdpa")
    assert seen == [False, False, False]


def test_channel_major_heads_run_contiguous_where_measured_faster(monkeypatch):
    """q, k, v as channel-major views ([B, H, d, N] transposed: ``AttentionBlock``, the
    autoencoder's mid-block) reach PyTorch's fp32 CPU kernel contiguous for narrow heads
    (``CHANNEL_MAJOR_MAX_HEAD_DIM``, ``CHANNEL_MAJOR_MAX_HEAD_DIM_GRAD`` with a graph) and, in
    inference, from ``CONTIGUOUS_MIN_TOKENS`` positions; wide heads keep the views, and the
    values and gradients are the float64 reference's either way."""
    seen = _spy_contiguity(monkeypatch)
    torch.manual_seed(0)
    n = 48

    def run(b, h, d, grad):
        flat = [torch.randn(b, h, d, n, requires_grad=grad) for _ in range(3)]

        def views(ts):
            return [t.transpose(2, 3) for t in ts]

        with torch.set_grad_enabled(grad):
            out = attention(*views(flat), backend="sdpa")
        if grad:
            _check_against_float64(flat, views, out, d)
        return seen.pop()

    assert run(2, 4, 32, grad=False) is True
    assert run(2, 4, 32, grad=True) is True
    assert run(1, 2, 128, grad=False) is True
    assert run(1, 2, 128, grad=True) is False
    assert run(1, 1, 512, grad=False) is False
    monkeypatch.setattr(backends, "CONTIGUOUS_MIN_TOKENS", n)
    assert run(1, 1, 512, grad=False) is True
    assert run(1, 1, 512, grad=True) is False
