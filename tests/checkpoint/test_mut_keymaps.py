"""Key maps on the real SD v1 / SDXL key lists, name by name: the expected diffusers / Hugging Face
names are written out here (diffusers' `UNet2DConditionModel` and transformers' `CLIPTextModel`
naming), so a wrong level, index or table entry fails even where a round trip would not notice."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tsv_state_dict

from ldm.checkpoint.keymap_text import (
    clip_to_hf,
    hf_to_clip,
    hf_to_openclip,
    openclip_num_layers,
    openclip_to_hf,
)
from ldm.checkpoint.keymap_unet import (
    num_res_blocks_diffusers,
    num_res_blocks_ldm,
    unet_to_diffusers,
    unet_to_ldm,
)
from ldm.checkpoint.keymap_vae import vae_to_diffusers, vae_to_ldm

UNET = "model.diffusion_model."


def _unet(name: str) -> dict[str, torch.Tensor]:
    sd = tsv_state_dict(name)
    return {k[len(UNET) :]: v for k, v in sd.items() if k.startswith(UNET)}


@pytest.fixture(scope="module")
def v1_unet() -> dict[str, torch.Tensor]:
    return _unet("sd-v1-unet-vae.tsv")


@pytest.fixture(scope="module")
def xl_unet() -> dict[str, torch.Tensor]:
    return _unet("sdxl-base.tsv")


# SD v1: 4 levels, 2 resnets each, attention at levels 0-2 (down) / 1-3 (up, reversed order)
V1_UNET_NAMES = {
    "time_embed.0.weight": "time_embedding.linear_1.weight",
    "time_embed.2.bias": "time_embedding.linear_2.bias",
    "input_blocks.0.0.weight": "conv_in.weight",
    "out.0.weight": "conv_norm_out.weight",
    "out.2.bias": "conv_out.bias",
    "input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
    "input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
    "input_blocks.2.0.emb_layers.1.weight": "down_blocks.0.resnets.1.time_emb_proj.weight",
    "input_blocks.2.0.out_layers.0.bias": "down_blocks.0.resnets.1.norm2.bias",
    "input_blocks.2.0.out_layers.3.weight": "down_blocks.0.resnets.1.conv2.weight",
    "input_blocks.1.1.proj_in.weight": "down_blocks.0.attentions.0.proj_in.weight",
    "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    ),
    "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
    "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
    "input_blocks.5.1.norm.bias": "down_blocks.1.attentions.1.norm.bias",
    "input_blocks.6.0.op.bias": "down_blocks.1.downsamplers.0.conv.bias",
    "input_blocks.8.1.proj_out.bias": "down_blocks.2.attentions.1.proj_out.bias",
    "input_blocks.9.0.op.weight": "down_blocks.2.downsamplers.0.conv.weight",
    "input_blocks.10.0.in_layers.2.bias": "down_blocks.3.resnets.0.conv1.bias",
    "input_blocks.11.0.in_layers.0.weight": "down_blocks.3.resnets.1.norm1.weight",
    "middle_block.0.in_layers.0.weight": "mid_block.resnets.0.norm1.weight",
    "middle_block.1.proj_out.weight": "mid_block.attentions.0.proj_out.weight",
    "middle_block.1.transformer_blocks.0.norm3.bias": (
        "mid_block.attentions.0.transformer_blocks.0.norm3.bias"
    ),
    "middle_block.2.out_layers.3.weight": "mid_block.resnets.1.conv2.weight",
    "output_blocks.0.0.skip_connection.weight": "up_blocks.0.resnets.0.conv_shortcut.weight",
    "output_blocks.1.0.in_layers.0.bias": "up_blocks.0.resnets.1.norm1.bias",
    "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.3.1.norm.weight": "up_blocks.1.attentions.0.norm.weight",
    "output_blocks.4.0.out_layers.0.weight": "up_blocks.1.resnets.1.norm2.weight",
    "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
    "output_blocks.8.0.emb_layers.1.bias": "up_blocks.2.resnets.2.time_emb_proj.bias",
    "output_blocks.8.2.conv.weight": "up_blocks.2.upsamplers.0.conv.weight",
    "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": (
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight"
    ),
}

# SDXL base: 3 levels, 2 resnets each, attention at levels 1-2 (down) / 0-1 (up); the vector
# conditioning MLP is diffusers' `add_embedding` (addition_embed_type="text_time")
XL_UNET_NAMES = {
    "label_emb.0.0.weight": "add_embedding.linear_1.weight",
    "label_emb.0.0.bias": "add_embedding.linear_1.bias",
    "label_emb.0.2.weight": "add_embedding.linear_2.weight",
    "label_emb.0.2.bias": "add_embedding.linear_2.bias",
    "input_blocks.2.0.in_layers.2.weight": "down_blocks.0.resnets.1.conv1.weight",
    "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
    "input_blocks.4.1.proj_in.weight": "down_blocks.1.attentions.0.proj_in.weight",
    "input_blocks.6.0.op.bias": "down_blocks.1.downsamplers.0.conv.bias",
    "input_blocks.8.1.transformer_blocks.9.attn1.to_out.0.weight": (
        "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_out.0.weight"
    ),
    "output_blocks.2.1.norm.weight": "up_blocks.0.attentions.2.norm.weight",
    "output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.3.0.skip_connection.bias": "up_blocks.1.resnets.0.conv_shortcut.bias",
    "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
    "output_blocks.6.0.in_layers.0.weight": "up_blocks.2.resnets.0.norm1.weight",
    "output_blocks.8.0.out_layers.3.weight": "up_blocks.2.resnets.2.conv2.weight",
}


def _check_names(ldm: dict, names: dict[str, str], text_time: bool = False) -> None:
    hub = unet_to_diffusers(ldm, text_time=text_time)
    assert len(hub) == len(ldm)  # no two keys collide
    for a, b in names.items():
        assert hub[b] is ldm[a], (a, b)
    back = unet_to_ldm(hub)
    assert set(back) == set(ldm)
    assert all(back[k] is v for k, v in ldm.items())


def test_unet_v1_names(v1_unet) -> None:
    _check_names(v1_unet, V1_UNET_NAMES)
    assert num_res_blocks_ldm(list(v1_unet)) == 2


def test_unet_sdxl_names(xl_unet) -> None:
    _check_names(xl_unet, XL_UNET_NAMES, text_time=True)
    assert num_res_blocks_ldm(list(xl_unet)) == 2
    plain = unet_to_diffusers(xl_unet)  # without text_time: a class-label MLP
    assert plain["class_embedding.linear_1.weight"] is xl_unet["label_emb.0.0.weight"]
    assert plain["class_embedding.linear_2.bias"] is xl_unet["label_emb.0.2.bias"]
    assert not any(k.startswith("add_embedding.") for k in plain)


def test_unet_class_label_embedding_names() -> None:
    """`num_classes` int: an nn.Embedding `label_emb` <-> diffusers' `class_embedding`."""
    w = torch.zeros(10, 8)
    lin = torch.ones(8, 4)
    keys = {
        "label_emb.weight": w,
        "input_blocks.0.0.weight": lin,
        "input_blocks.1.0.op.weight": lin,
    }
    hub = unet_to_diffusers(keys)
    assert hub["class_embedding.weight"] is w
    assert unet_to_ldm(
        {"class_embedding.weight": w, "down_blocks.0.resnets.0.norm1.weight": lin}
    ) == {
        "label_emb.weight": w,
        "input_blocks.1.0.in_layers.0.weight": lin,
    }
    back = unet_to_ldm(
        {
            "class_embedding.linear_1.weight": w,
            "add_embedding.linear_2.bias": lin,
            "down_blocks.0.resnets.0.norm1.weight": lin,
        }
    )
    assert back["label_emb.0.0.weight"] is w and back["label_emb.0.2.bias"] is lin


@pytest.mark.parametrize(
    "key",
    [
        "input_blocks.3.0.conv.weight",  # a Downsample position without `op.`
        "input_blocks.1.0.norm1.weight",  # resnet submodule unknown to CompVis
        "input_blocks.1.1.conv.weight",  # not a transformer submodule
        "input_blocks.1.2.norm.weight",  # no third module in a down block
        "middle_block.0.proj_in.weight",
        "middle_block.1.in_layers.0.weight",
        "output_blocks.0.0.proj_in.weight",
        "output_blocks.0.1.in_layers.0.weight",
        "output_blocks.0.2.norm.weight",
        "label_emb.1.weight",
        "something.weight",
    ],
)
def test_unet_foreign_compvis_keys_raise(key: str) -> None:
    keys = {"input_blocks.3.0.op.weight": torch.zeros(1), key: torch.zeros(1)}  # n = 2
    with pytest.raises(KeyError, match="no diffusers equivalent"):
        unet_to_diffusers(keys)


@pytest.mark.parametrize(
    "key",
    [
        "down_blocks.0.resnets.0.in_layers.0.weight",
        "down_blocks.0.downsamplers.0.op.weight",
        "down_blocks.0.resnets.0.conv.weight",  # `conv.` names only a downsampler's conv
        "down_blocks.0.norms.0.weight",
        "mid_block.resnets.0.in_layers.0.weight",
        "mid_block.norms.0.weight",
        "up_blocks.0.resnets.0.out_layers.0.weight",
        "up_blocks.0.norms.0.weight",
        "time_embedding.linear_3.weight",
    ],
)
def test_unet_foreign_diffusers_keys_raise(key: str) -> None:
    keys = {"down_blocks.0.resnets.1.norm1.weight": torch.zeros(1), key: torch.zeros(1)}
    with pytest.raises(KeyError, match="no CompVis equivalent"):
        unet_to_ldm(keys)


def test_num_res_blocks() -> None:
    # the first Downsample is the smallest `op` index, whatever the key order
    keys = ["input_blocks.7.0.op.weight", "input_blocks.4.0.op.weight", "input_blocks.5.0.x"]
    assert num_res_blocks_ldm(keys) == 3
    # `op` only counts as the module of block sub 0; no Downsample: the last input block index
    keys = [
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.3.1.op.w",
    ]
    assert num_res_blocks_ldm(keys) == 3
    assert num_res_blocks_ldm(["input_blocks.0.0.weight", "out.0.op.weight"]) == 0
    keys = ["up_blocks.0.resnets.5.x", "down_blocks.1.resnets.4.x", "down_blocks.0.resnets.2.x"]
    assert num_res_blocks_diffusers(keys) == 3


# SD v1 KL-f8: 4 levels; diffusers numbers decoder levels from the lowest resolution
V1_VAE_NAMES = {
    "encoder.conv_in.weight": "encoder.conv_in.weight",
    "encoder.norm_out.bias": "encoder.conv_norm_out.bias",
    "encoder.down.0.block.1.conv2.weight": "encoder.down_blocks.0.resnets.1.conv2.weight",
    "encoder.down.1.block.0.nin_shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
    "encoder.down.2.downsample.conv.bias": "encoder.down_blocks.2.downsamplers.0.conv.bias",
    "encoder.mid.block_2.norm1.weight": "encoder.mid_block.resnets.1.norm1.weight",
    "encoder.mid.attn_1.norm.weight": "encoder.mid_block.attentions.0.group_norm.weight",
    "decoder.mid.attn_1.proj_out.bias": "decoder.mid_block.attentions.0.to_out.0.bias",
    "decoder.up.0.block.2.norm2.bias": "decoder.up_blocks.3.resnets.2.norm2.bias",
    "decoder.up.1.block.0.nin_shortcut.bias": "decoder.up_blocks.2.resnets.0.conv_shortcut.bias",
    "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
    "post_quant_conv.weight": "post_quant_conv.weight",
}


def test_vae_v1_names() -> None:
    pre = "first_stage_model."
    ldm = {
        k[len(pre) :]: v
        for k, v in tsv_state_dict("sd-v1-unet-vae.tsv").items()
        if k.startswith(pre)
    }
    hub = vae_to_diffusers(ldm)
    for a, b in V1_VAE_NAMES.items():
        assert hub[b] is ldm[a], (a, b)
    q = ldm["decoder.mid.attn_1.q.weight"]  # 1x1 conv [C, C, 1, 1] <-> linear [C, C]
    assert q.shape == (512, 512, 1, 1) and hub[
        "decoder.mid_block.attentions.0.to_q.weight"
    ].shape == (512, 512)
    back = vae_to_ldm(hub)
    assert set(back) == set(ldm) and back["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_vae_mid_block_shortcut_names() -> None:
    """A mid-block resnet changing width would carry a shortcut; its name maps both ways."""
    w = torch.zeros(2, 3, 1, 1)
    hub = {
        "decoder.up_blocks.0.resnets.0.norm1.weight": w,
        "encoder.mid_block.resnets.1.conv_shortcut.weight": w,
    }
    assert vae_to_ldm(hub)["encoder.mid.block_2.nin_shortcut.weight"] is w
    ldm = {"decoder.up.0.block.0.norm1.weight": w, "encoder.mid.block_2.nin_shortcut.weight": w}
    assert vae_to_diffusers(ldm)["encoder.mid_block.resnets.1.conv_shortcut.weight"] is w


# -- text encoders -----------------------------------------------------------------------------

CLIP = "cond_stage_model.transformer."
XL_CLIP = "conditioner.embedders.0.transformer."
XL_BIGG = "conditioner.embedders.1.model."


def test_clip_to_hf_flat_v1_file() -> None:
    sd = tsv_state_dict("sd-v1-text-encoder.tsv")
    sd[CLIP + "embeddings.position_ids"] = torch.zeros(1, 77, dtype=torch.long)
    hub, extras, nested = clip_to_hf(sd)
    assert nested is False
    assert extras == {CLIP + "embeddings.position_ids": sd[CLIP + "embeddings.position_ids"]}
    assert len(hub) == len(sd) - 1
    k = "encoder.layers.11.self_attn.q_proj.weight"
    assert hub["text_model." + k] is sd[CLIP + k]
    assert hub["text_model.final_layer_norm.bias"] is sd[CLIP + "final_layer_norm.bias"]
    back = hf_to_clip(hub, nested=False)
    assert set(back) == set(sd) - set(extras) and all(back[k] is sd[k] for k in back)
    nested_back = hf_to_clip(hub)  # the default: the `text_model.` level of newer files
    assert nested_back[CLIP + "text_model." + k] is sd[CLIP + k]
    assert len(nested_back) == len(hub)


def test_clip_to_hf_nested_and_prefixed() -> None:
    w, b, ids = torch.zeros(3), torch.ones(3), torch.arange(77)[None]
    sd = {
        XL_CLIP + "text_model.final_layer_norm.weight": w,
        XL_CLIP + "text_model.embeddings.position_ids": ids,
        XL_CLIP + "text_model.encoder.layers.0.mlp.fc1.bias": b,
    }
    hub, extras, nested = clip_to_hf(sd, prefix=XL_CLIP)
    assert nested is True
    assert hub == {
        "text_model.final_layer_norm.weight": w,
        "text_model.encoder.layers.0.mlp.fc1.bias": b,
    }
    assert extras == {XL_CLIP + "text_model.embeddings.position_ids": ids}
    # a flat file whose only `text_model.` key is the position_ids buffer is still flat
    flat = {
        XL_CLIP + "final_layer_norm.weight": w,
        XL_CLIP + "text_model.embeddings.position_ids": ids,
    }
    hub, extras, nested = clip_to_hf(flat, prefix=XL_CLIP)
    assert nested is False and hub == {"text_model.final_layer_norm.weight": w}
    # back, from the flat names transformers 5 saves; position_ids are dropped
    back = hf_to_clip(
        {"text_model.embeddings.position_ids": ids, "final_layer_norm.weight": w}, prefix=XL_CLIP
    )
    assert back == {XL_CLIP + "text_model.final_layer_norm.weight": w}


def _tiny_openclip(prefix: str, d: int = 4, layers: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {
        prefix + "token_embedding.weight": torch.randn(10, d, generator=g),
        prefix + "positional_embedding": torch.randn(77, d, generator=g),
        prefix + "ln_final.weight": torch.randn(d, generator=g),
        prefix + "ln_final.bias": torch.randn(d, generator=g),
        prefix + "text_projection": torch.randn(d, d + 2, generator=g),  # [D, P]
        prefix + "logit_scale": torch.tensor(4.6),
    }
    shapes = {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.in_proj_weight": (3 * d, d),
        "attn.in_proj_bias": (3 * d,),
        "attn.out_proj.weight": (d, d),
        "attn.out_proj.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "mlp.c_fc.weight": (4 * d, d),
        "mlp.c_fc.bias": (4 * d,),
        "mlp.c_proj.weight": (d, 4 * d),
        "mlp.c_proj.bias": (d,),
    }
    for i in range(layers):
        for name, shape in shapes.items():
            sd[f"{prefix}transformer.resblocks.{i}.{name}"] = torch.randn(shape, generator=g)
    return sd


OPENCLIP_LAYER_NAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}


def _check_openclip_layer(hub: dict, sd: dict, prefix: str, i: int) -> None:
    src = f"{prefix}transformer.resblocks.{i}."
    dst = f"text_model.encoder.layers.{i}."
    for a, b in OPENCLIP_LAYER_NAMES.items():
        assert hub[dst + b] is sd[src + a], (a, b)
    d = sd[src + "ln_1.weight"].shape[0]
    w, bias = sd[src + "attn.in_proj_weight"], sd[src + "attn.in_proj_bias"]
    for n, part in enumerate("qkv"):  # rows [0, D) are q, [D, 2D) k, [2D, 3D) v
        assert torch.equal(hub[dst + f"self_attn.{part}_proj.weight"], w[n * d : (n + 1) * d])
        assert torch.equal(hub[dst + f"self_attn.{part}_proj.bias"], bias[n * d : (n + 1) * d])


def test_openclip_v2_keeps_penultimate_layers() -> None:
    """SD v2: 23 of 24 layers; the last layer, text_projection and logit_scale become extras."""
    prefix = "cond_stage_model.model."
    sd = _tiny_openclip(prefix, layers=3)
    assert openclip_num_layers(sd) == 3
    hub, extras = openclip_to_hf(sd, keep_layers=2)
    assert (
        hub["text_model.embeddings.token_embedding.weight"] is sd[prefix + "token_embedding.weight"]
    )
    assert (
        hub["text_model.embeddings.position_embedding.weight"]
        is sd[prefix + "positional_embedding"]
    )
    assert hub["text_model.final_layer_norm.weight"] is sd[prefix + "ln_final.weight"]
    assert hub["text_model.final_layer_norm.bias"] is sd[prefix + "ln_final.bias"]
    for i in range(2):
        _check_openclip_layer(hub, sd, prefix, i)
    assert len(hub) == 4 + 2 * 16
    last = {k for k in sd if ".resblocks.2." in k}
    assert set(extras) == last | {prefix + "text_projection", prefix + "logit_scale"}
    back = hf_to_openclip(hub)
    assert set(back) == set(sd) - set(extras)
    assert all(torch.equal(back[k], sd[k]) for k in back)
    # the full-size v2 list: 24 layers, the 23 kept ones mapped
    full = tsv_state_dict("sd-v2-text-encoder.tsv")
    assert openclip_num_layers(full) == 24
    hub, extras = openclip_to_hf(full, keep_layers=23)
    assert "text_model.encoder.layers.22.mlp.fc2.bias" in hub
    assert not any(".layers.23." in k for k in hub) and len(extras) == 12 + 2


def test_openclip_sdxl_projection_is_transposed() -> None:
    sd = _tiny_openclip(XL_BIGG, layers=2)
    assert openclip_num_layers(sd, prefix=XL_BIGG) == 2
    hub, extras = openclip_to_hf(sd, prefix=XL_BIGG, projection=True)
    proj = sd[XL_BIGG + "text_projection"]  # [D, P]: x @ P
    assert torch.equal(hub["text_projection.weight"], proj.T)  # Linear weight [P, D]: x @ W.T
    assert hub["text_projection.weight"].is_contiguous()
    for i in range(2):
        _check_openclip_layer(hub, sd, XL_BIGG, i)
    assert extras == {XL_BIGG + "logit_scale": sd[XL_BIGG + "logit_scale"]}
    # back: transposed again, q/k/v fused in order; flat names and position_ids accepted
    flat = {"embeddings.position_ids": torch.arange(77)[None]}  # first: the others follow
    flat.update({k.removeprefix("text_model."): v for k, v in hub.items()})
    for given in (hub, flat):
        back = hf_to_openclip(given, prefix=XL_BIGG)
        assert set(back) == set(sd) - set(extras)
        assert all(torch.equal(back[k], sd[k]) for k in back)
        assert back[XL_BIGG + "text_projection"].is_contiguous()


@pytest.mark.parametrize(
    "key", ["text_model.encoder.norm.weight", "text_model.encoder.layers.0.mlp.fc3.weight"]
)
def test_hf_to_openclip_foreign_keys_raise(key: str) -> None:
    with pytest.raises(KeyError, match="no OpenCLIP equivalent"):
        hf_to_openclip({key: torch.zeros(1)})


def test_openclip_to_hf_foreign_layer_key_raises() -> None:
    sd = {"cond_stage_model.model.transformer.resblocks.0.attn.q_proj.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="no CLIPTextModel equivalent"):
        openclip_to_hf(sd)
