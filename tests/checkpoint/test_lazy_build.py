"""Building with parameters on the meta device and assigning the checkpoint's tensors gives the
same model as building with random weights and loading into it."""

from __future__ import annotations

import torch
from tiny_sdxl import build_tiny_sdxl, tiny_sdxl_config

from ldm.checkpoint.lazy_build import assign_weights, parameters_on_meta
from ldm.checkpoint.loader import build_model


def test_lazy_build_then_assign_equals_eager_load() -> None:
    ref = build_tiny_sdxl(seed=5)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}  # an fp16 file
    del sd["conditioner.embedders.1.model.logit_scale"]  # optional, absent from some files
    model = build_model(tiny_sdxl_config(), lazy=True)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # schedule, masks: real values
    torch.testing.assert_close(model.alphas_cumprod, ref.alphas_cumprod)
    assign_weights(model, dict(sd))
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # cast to the declared dtype
    assert model.conditioner.embedders[1].model.logit_scale.item() == 0.0
    for name, p in model.named_parameters():
        if name in sd:
            assert torch.equal(p, sd[name].float()), name
    eager = build_model(tiny_sdxl_config())
    eager.load_state_dict(sd, strict=False)
    kw = {"sampler": "euler", "steps": 3, "seed": 0, "output": "latent", "height": 32, "width": 32}
    torch.testing.assert_close(model.generate("a", **kw), eager.generate("a", **kw))


def test_parameters_on_meta_restores_registration() -> None:
    with parameters_on_meta():
        inner = torch.nn.Linear(3, 4)
    outer = torch.nn.Linear(3, 4)
    assert inner.weight.is_meta and not outer.weight.is_meta
