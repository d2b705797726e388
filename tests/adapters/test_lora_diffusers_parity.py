"""A LoRA made on our side, saved in diffusers format and loaded by diffusers' own
`UNet2DConditionModel.load_lora_adapter`, gives our U-Net's output (ours via apply_loras);
the kohya file of the same LoRA loads to identical weights, in ours and in diffusers."""

from __future__ import annotations

import logging

import pytest
import torch
from lora_files import shapes_of
from tiny_models import TINY_UNET
from torch import nn

from ldm.adapters.lora_apply import apply_loras, merge_into_state_dict
from ldm.adapters.lora_io import load_lora, save_lora
from ldm.adapters.lora_weights import LoraModule
from ldm.modules.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

pytestmark = pytest.mark.usefixtures("one_thread")
logger = logging.getLogger(__name__)

# SD v1 layout (conv proj_in, heads by num_heads) at a small width
PARAMS = {**TINY_UNET, "attention_resolutions": [1, 2], "context_dim": 24}
U = "model.diffusion_model."
# our key -> (rank, alpha): attention, proj_in / proj_out (1x1 conv), feed-forward, ResBlock convs.
# to_out keeps the common alpha: diffusers' kohya converter names its alpha after the old
# `processor.to_out_lora` module, which peft then fails to match (a diffusers quirk, not a format fact)
TARGETS = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (4, 3.0),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (4, 3.0),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight": (2, 3.0),
    "input_blocks.1.1.proj_in.weight": (4, 3.0),
    "middle_block.1.proj_out.weight": (3, 1.5),
    "output_blocks.2.1.transformer_blocks.0.ff.net.0.proj.weight": (4, 3.0),
    "input_blocks.1.0.in_layers.2.weight": (2, 5.0),
    "output_blocks.1.0.out_layers.3.weight": (2, 5.0),
    "output_blocks.2.0.skip_connection.weight": (4, 3.0),
}


class Engine(nn.Module):
    """Our U-Net under the engine's key prefix `model.diffusion_model.`."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet


def _randomize(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _diffusers_unet(unet: UNetModel) -> UNet2DConditionModel:
    original = {
        "model": {
            "params": {
                "unet_config": {"params": PARAMS},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    ckpt = {U + k: v for k, v in unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, ckpt, image_size=64)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return ref.eval()


def _lora(shapes: dict[str, torch.Size]) -> dict[str, LoraModule]:
    gen = torch.Generator().manual_seed(7)
    out = {}
    for rest, (r, alpha) in TARGETS.items():
        shape = shapes[U + rest]
        kernel = tuple(shape[2:])
        down = torch.randn(r, *shape[1:], generator=gen) * 0.3
        up = torch.randn(shape[0], r, *((1, 1) if kernel else ()), generator=gen) * 0.3
        out[U + rest] = LoraModule(down, up, alpha)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNetModel(**PARAMS).eval()
    _randomize(unet)
    engine = Engine(unet)
    ref = _diffusers_unet(unet)
    shapes = shapes_of(engine)
    modules = _lora(shapes)
    root = tmp_path_factory.mktemp("lora")
    paths = {
        fmt: save_lora(root / f"{fmt}.safetensors", modules, shapes, format=fmt)
        for fmt in ("diffusers", "kohya")
    }
    return engine, ref, shapes, modules, paths


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([3.0, 917.0]),
        torch.randn(2, 5, 24, generator=g),
    )


def _compare(engine: Engine, ref: UNet2DConditionModel, path) -> float:
    x, t, ctx = _inputs()
    with torch.no_grad():
        base = engine.model.diffusion_model(x, t, context=ctx)
        with apply_loras(engine, [(path, 1.0)]):
            ours = engine.model.diffusion_model(x, t, context=ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    assert (ours - base).abs().max() > 1e-2  # the LoRA matters
    return (ours - theirs).abs().max().item()


def test_diffusers_file_matches_diffusers_load_lora_adapter(setup):
    engine, ref, _, _, paths = setup
    ref.load_lora_adapter(
        str(paths["diffusers"]), prefix="unet", adapter_name="ours", use_safetensors=True
    )
    try:
        err = _compare(engine, ref, paths["diffusers"])
    finally:
        ref.delete_adapters("ours")
    logger.info("diffusers LoRA parity: max abs error %.3g", err)
    assert err <= 1e-4, f"max abs diff {err:.3g} vs diffusers"


def test_kohya_file_through_diffusers_converter_matches(setup):
    engine, ref, _, _, paths = setup
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(paths["kohya"]), use_safetensors=True)
    ref.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, adapter_name="kohya")
    try:
        err = _compare(engine, ref, paths["kohya"])
    finally:
        ref.delete_adapters("kohya")
    logger.info("kohya LoRA via diffusers' converter: max abs error %.3g", err)
    assert err <= 1e-4, f"max abs diff {err:.3g} vs diffusers"


def test_kohya_and_diffusers_files_give_identical_weights(setup):
    engine, _, shapes, modules, paths = setup
    kohya, diff = load_lora(paths["kohya"], shapes), load_lora(paths["diffusers"], shapes)
    assert (kohya.format, diff.format) == ("kohya", "diffusers")
    assert set(kohya.modules) == set(diff.modules) == set(modules)
    for key, m in modules.items():
        for got in (kohya.modules[key], diff.modules[key]):
            assert torch.equal(got.down, m.down) and torch.equal(got.up, m.up), key
            assert got.alpha == m.alpha, key
    sd = engine.state_dict()
    a, b = merge_into_state_dict(sd, [(kohya, 0.7)]), merge_into_state_dict(sd, [(diff, 0.7)])
    assert all(torch.equal(a[k], b[k]) for k in sd)
