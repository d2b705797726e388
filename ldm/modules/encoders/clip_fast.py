"""A faster CPU inference forward of transformers' ``CLIPTextModel`` (SD v1's and SDXL's CLIP
text towers), reading the module's own parameters.

``clip_text_forward(model, input_ids, hidden=...)`` returns what ``model(input_ids)`` gives
(last hidden state after the final LayerNorm, the pooled end-token state, and, with ``hidden``,
the tuple of hidden states: the embeddings, then each layer's output) or None where it does not
apply (``fast_path_applies``): then the caller runs the module itself. Per layer it runs

- q, k and v as one linear layer (the weights concatenated),
- causal ``scaled_dot_product_attention`` without a mask tensor,
- the activation in place on the MLP's own intermediate; where the MLP's weights are packed
  (results then differ from the module's by the GEMM's rounding anyway) quick-GELU runs as one
  SiLU, ``x * sigmoid(1.702 x) = silu(1.702 x) / 1.702``, with 1.702 folded into fc1 and
  1 / 1.702 into fc2; elsewhere it is transformers' expression, and the outputs are bit for bit
  the module's,
- every linear layer pre-packed for the CPU's GEMM (``ldm.modules.packed_linear``: MKL's packed
  sgemm in fp32, oneDNN's blocked layout in bf16),

with the fused and packed weights cached per model while its linear layers' parameters are
unchanged (``ldm.modules.weight_cache``; about 0.7 GB for CLIP ViT-L/14 in fp32, MKL's packed
buffers, 0.16 GB in bf16). Measured in ``benchmarks/bench_text_encoder.py``. It applies on the CPU when
no autograd graph is needed (nothing requires grad, or grad mode is off), outside autocast and
``torch.compile``, for the standard module layout (no PEFT layers, parametrizations or hooks
inside the encoder), ``quick_gelu`` / ``gelu`` activations and no attention dropout in training
mode. ``LDM_FAST_TEXT=0`` switches it off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.module_hooks import hooked
from ldm.modules.packed_linear import PackedLinear
from ldm.modules.weight_cache import DerivedWeights, env_switch

QUICK_GELU = 1.702
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")

# 256 probed values per weight (a LoRA merge or an EMA swap through ``.data`` moves them all;
# each probed value is a cache miss, 73k of them cost 2 ms per call); biases by version only
_CACHE = DerivedWeights(probe_size=256)


def fast_text_enabled() -> bool:
    """``LDM_FAST_TEXT`` (default on)."""
    return env_switch(
        "LDM_FAST_TEXT", off="transformers' own CLIP forward", on="the packed CPU forward"
    )


def _text_model(model: nn.Module) -> nn.Module:
    return getattr(model, "text_model", model)  # transformers 4 nests it; 5 does not


def _standard_layer(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    linears += [getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)]
    norms = [getattr(layer, "layer_norm1", None), getattr(layer, "layer_norm2", None)]
    return (
        all(type(m) is nn.Linear and not hooked(m) for m in linears)
        and all(type(m) is nn.LayerNorm and not hooked(m) for m in norms)
        and not any(hooked(m) for m in (layer, attn, mlp))
    )


def fast_path_applies(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether ``clip_text_forward`` can stand in for ``model(input_ids)`` (module docstring)."""
    tm = _text_model(model)
    config = getattr(model, "config", None)
    encoder, embeddings = getattr(tm, "encoder", None), getattr(tm, "embeddings", None)
    final_norm = getattr(tm, "final_layer_norm", None)
    if config is None or encoder is None or embeddings is None or final_norm is None:
        return False
    if (
        input_ids.device.type != "cpu"
        or input_ids.dim() != 2
        or input_ids.shape[1] > embeddings.position_embedding.weight.shape[0]
        or getattr(config, "hidden_act", None) not in ACTIVATIONS
        or (model.training and getattr(config, "attention_dropout", 0.0))
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled("cpu")
        or not fast_text_enabled()
    ):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return False
    if (
        type(final_norm) is not nn.LayerNorm
        or embeddings.position_embedding.weight.device.type != "cpu"
        or any(hooked(m) for m in (model, tm, encoder, embeddings))
    ):
        return False
    return all(_standard_layer(layer) for layer in encoder.layers)


class _FastLayer:
    """One encoder layer's fused and packed linear layers."""

    def __init__(self, layer: nn.Module, num_heads: int, activation: str) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = attn.q_proj.weight.shape[0] // num_heads
        self.scale = float(getattr(attn, "scale", head_dim**-0.5))

        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        wqkv = torch.cat([m.weight.detach() for m in projections])
        bqkv = None
        if any(m.bias is not None for m in projections):
            bqkv = torch.cat(
                [
                    m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach()
                    for m in projections
                ]
            )
        self.qkv = PackedLinear(wqkv, bqkv, owns_weight=True)
        self.out = PackedLinear(attn.out_proj.weight, attn.out_proj.bias)
        self.quick = activation == "quick_gelu"
        self.tanh = activation in ("gelu_new", "gelu_pytorch_tanh")
        w1, w2 = mlp.fc1.weight, mlp.fc2.weight
        self.folded = self.quick and "plain" not in {
            PackedLinear.kind_for(w1),
            PackedLinear.kind_for(w2),
        }
        if self.folded:  # silu(1.702 h) / 1.702: the factors go into the packed fc1 and fc2
            work = torch.float64 if w1.dtype == torch.float64 else torch.float32
            b1 = mlp.fc1.bias
            self.fc1 = PackedLinear(
                (w1.detach().to(work) * QUICK_GELU).to(w1.dtype),
                None if b1 is None else (b1.detach().to(work) * QUICK_GELU).to(b1.dtype),
                owns_weight=True,
            )
            self.fc2 = PackedLinear(
                (w2.detach().to(work) / QUICK_GELU).to(w2.dtype), mlp.fc2.bias, owns_weight=True
            )
        else:
            self.fc1 = PackedLinear(w1, mlp.fc1.bias)
            self.fc2 = PackedLinear(w2, mlp.fc2.bias)
        self.num_heads = num_heads
        self.layer = layer  # its LayerNorms are read live on every call

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in (self.qkv, self.out, self.fc1, self.fc2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        norm1, norm2 = self.layer.layer_norm1, self.layer.layer_norm2
        h = F.layer_norm(x, (d,), norm1.weight, norm1.bias, norm1.eps)
        qkv = self.qkv(h).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True, scale=self.scale)
        x = x + self.out(o.transpose(1, 2).reshape(b, n, d))
        h = F.layer_norm(x, (d,), norm2.weight, norm2.bias, norm2.eps)
        h = self.fc1(h)
        if self.folded:
            h = F.silu(h, inplace=True)
        elif self.quick:  # transformers' x * sigmoid(1.702 x), on h's own storage
            h = h.mul_(torch.sigmoid(h * QUICK_GELU))
        else:
            h = F.gelu(h, approximate="tanh" if self.tanh else "none")
        return x.add_(self.fc2(h))


def _linear_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights, biases) of every encoder layer's linear layers, in order."""
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    for layer in _text_model(model).encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
            weights.append(m.weight)
            if m.bias is not None:
                biases.append(m.bias)
    return weights, biases


def _fast_layers(model: nn.Module) -> list[_FastLayer] | None:
    """The encoder's fused and packed layers, cached for the model while its linear layers'
    parameters are unchanged; None where they cannot be cached (inference-mode tensors)."""
    config = model.config
    heads, act = config.num_attention_heads, config.hidden_act
    weights, biases = _linear_params(model)
    return _CACHE.get(
        model,
        weights,
        ("clip", heads, act),
        lambda: [_FastLayer(layer, heads, act) for layer in _text_model(model).encoder.layers],
        unprobed=biases,
    )


def _pooled(tm: nn.Module, config: Any, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The end-token state per row, as transformers picks it (``eos_token_id == 2``, the legacy
    configs: the highest token id; else the first ``eos_token_id``)."""
    eos = getattr(tm, "eos_token_id", getattr(config, "eos_token_id", 2))
    ids = ids.to(dtype=torch.int)
    index = ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)
    return x[torch.arange(x.shape[0], device=x.device), index.to(x.device)]


def clip_text_forward(
    model: nn.Module, input_ids: torch.Tensor, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None] | None:
    """(last hidden state, pooled state, hidden states or None) of ``model(input_ids)``, or None
    where the fast path does not apply."""
    if not fast_path_applies(model, input_ids):
        return None
    layers = _fast_layers(model)
    if layers is None:
        return None
    tm = _text_model(model)
    config = model.config
    with torch.no_grad():
        x = tm.embeddings(input_ids=input_ids)
        states = [x] if hidden else None
        for layer in layers:  # each returns a new tensor (its in-place add is on its own sum)
            x = layer(x)
            if states is not None:
                states.append(x)
        norm = tm.final_layer_norm
        last = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return last, _pooled(tm, config, last, input_ids), tuple(states) if hidden else None


def clear_cache() -> None:
    """Free every cached fused and packed weight of the fast text path."""
    _CACHE.clear()


def cache_bytes() -> int:
    """Memory held by the fast text path's cached weights."""
    return _CACHE.nbytes()


__all__ = [
    "cache_bytes",
    "clear_cache",
    "clip_text_forward",
    "fast_path_applies",
    "fast_text_enabled",
]
