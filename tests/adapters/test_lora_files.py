"""LoRA files against a model's shapes: what a file was made for, refusals that say why, the
older diffusers / peft key forms, alphas from the diffusers header, sd-scripts metadata on save."""

from __future__ import annotations

import json

import pytest
import torch
from lora_files import dyadic, tsv_shapes, write_kohya
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.adapters.lora_io import load_lora, save_lora
from ldm.adapters.lora_weights import LoraError, LoraModule

U = "model.diffusion_model."
V1 = ("sd-v1-unet-vae.tsv", "sd-v1-text-encoder.tsv")
V2 = ("sd-v2-unet-vae.tsv", "sd-v2-text-encoder.tsv")


@pytest.fixture(scope="module")
def v1() -> dict[str, torch.Size]:
    return tsv_shapes(*V1)


@pytest.fixture(scope="module")
def sdxl() -> dict[str, torch.Size]:
    return tsv_shapes("sdxl-base.tsv")


def _module(shape: torch.Size, r: int = 2, seed: int = 0, alpha: float | None = 1.0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    up_tail = (1, 1) if len(shape) == 4 else ()
    return LoraModule(dyadic(r, *shape[1:], gen=g), dyadic(shape[0], r, *up_tail, gen=g), alpha)


def test_sdxl_file_is_refused_by_an_sd_v1_model(tmp_path, v1, sdxl):
    keys = [
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
    ]
    path = save_lora(tmp_path / "lora.safetensors", {k: _module(sdxl[k]) for k in keys}, sdxl)
    assert load_lora(path, sdxl).made_for == "SDXL"
    with pytest.raises(LoraError) as err:
        load_lora(path, v1)
    msg = str(err.value)
    assert (
        "lora.safetensors was made for SDXL (two text encoders, cross-attention width 2048)" in msg
    )
    assert "this model is SD v1 (one CLIP text encoder, cross-attention width 768)" in msg
    assert "Use a LoRA trained for SD v1." in msg


def test_sd_v2_file_is_refused_by_an_sd_v1_model(tmp_path, v1):
    v2 = tsv_shapes(*V2)
    key = U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    path = save_lora(tmp_path / "v2.safetensors", {key: _module(v2[key])}, v2, format="diffusers")
    with pytest.raises(LoraError, match=r"made for SD v2 .*this model is SD v1"):
        load_lora(path, v1)


def test_metadata_tells_the_family_when_the_keys_cannot(tmp_path, v1):
    conv = _module(v1[U + "input_blocks.1.0.in_layers.2.weight"])
    path = write_kohya(
        tmp_path / "x.safetensors",
        {"lora_unet_down_blocks_0_resnets_0_conv1": (conv.down, conv.up, 1.0)},
        ss_base_model_version="sdxl_base_v1-0",
    )
    with pytest.raises(LoraError, match="made for SDXL"):
        load_lora(path, v1)


@pytest.mark.parametrize(
    "suffixes, kind",
    [
        (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"), "LoHa"),
        (("lokr_w1", "lokr_w2", "alpha"), "LoKr"),
        (("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"), "Tucker"),
        (("lora_down.weight", "lora_up.weight", "dora_scale", "alpha"), "DoRA"),
        (("diff",), 'LyCORIS "full"'),
        (("diff", "diff_b"), 'LyCORIS "full"'),
    ],
)
def test_lycoris_and_dora_files_are_refused_by_name(tmp_path, v1, suffixes, kind):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd = {f"{name}.{s}": torch.ones(2, 2) for s in suffixes}
    save_file(sd, str(tmp_path / "lyco.safetensors"))
    with pytest.raises(LoraError, match=kind):
        load_lora(tmp_path / "lyco.safetensors", v1)


def test_a_custom_model_lists_unknown_names_and_wrong_shapes_grouped(tmp_path, v1):
    key = U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    mods = {
        key: _module(v1[key]),
        U + "output_blocks.8.1.proj_in.weight": _module(v1[U + "output_blocks.8.1.proj_in.weight"]),
        "cond_stage_model.transformer.encoder.layers.11.mlp.fc1.weight": _module(
            v1["cond_stage_model.transformer.encoder.layers.11.mlp.fc1.weight"]
        ),
    }
    path = save_lora(tmp_path / "v1.safetensors", mods, v1)
    custom = {k: v for k, v in v1.items() if ".layers.11." not in k and "output_blocks.8" not in k}
    custom[key] = torch.Size([320, 32])  # another text width: a custom model, not SD v1
    with pytest.raises(LoraError) as err:
        load_lora(path, custom)
    msg = str(err.value)
    assert "this model, a custom model (SD layout, cross-attention width 32, 768)" in msg
    assert "2 module(s) name no weight of the model" in msg
    assert "lora_unet_up_blocks_2: 1 module, e.g. lora_unet_up_blocks_2_attentions_2_proj_in" in msg
    assert "lora_te_text_model_encoder_layers_11: 1 module" in msg
    assert "1 module(s) have the wrong shape" in msg and "(320, 32)" in msg


def test_older_diffusers_names_and_peft_prefixes_load(tmp_path, v1):
    q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    out = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    ff = U + "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"
    te_q = "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight"
    te_fc = "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
    mods = {k: _module(v1[k], seed=i, alpha=None) for i, k in enumerate([q, out, ff, te_q, te_fc])}
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    te = "text_encoder.text_model.encoder.layers.0"
    sd = {}
    for name, key in [
        (f"{attn}.attn1.processor.to_q_lora", q),
        (f"{attn}.attn1.processor.to_out_lora", out),
        (f"{te}.self_attn.to_q_lora", te_q),
    ]:
        sd[f"{name}.down.weight"], sd[f"{name}.up.weight"] = mods[key].down, mods[key].up
    peft = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    sd[f"{peft}.lora_A.default.weight"], sd[f"{peft}.lora_B.default.weight"] = (
        mods[ff].down,
        mods[ff].up,
    )
    fc = f"{te}.mlp.fc1.lora_linear_layer"
    sd[f"{fc}.down.weight"], sd[f"{fc}.up.weight"] = mods[te_fc].down, mods[te_fc].up
    save_file(sd, str(tmp_path / "old.safetensors"))
    lora = load_lora(tmp_path / "old.safetensors", v1)
    assert lora.format == "diffusers" and set(lora.modules) == set(mods)
    for key, m in mods.items():
        assert torch.equal(lora.modules[key].down, m.down) and lora.modules[key].alpha is None


def test_alphas_come_from_the_diffusers_header(tmp_path, v1):
    q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    k = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    sd = {}
    for key, proj in ((q, "to_q"), (k, "to_k")):
        m = _module(v1[key], r=4)
        sd[f"unet.{name}.{proj}.lora_A.weight"], sd[f"unet.{name}.{proj}.lora_B.weight"] = (
            m.down,
            m.up,
        )
    header = {"unet.r": 4, "unet.lora_alpha": 2.0, "unet.alpha_pattern": {f"{name}.to_k": 16.0}}
    save_file(sd, str(tmp_path / "d.safetensors"), {"lora_adapter_metadata": json.dumps(header)})
    lora = load_lora(tmp_path / "d.safetensors", v1)
    assert lora.modules[q].scale == 0.5 and lora.modules[k].scale == 4.0


def test_save_writes_sd_scripts_metadata(tmp_path, v1):
    conv = U + "input_blocks.1.0.in_layers.2.weight"
    mods = {
        U + "input_blocks.1.1.proj_in.weight": _module(
            v1[U + "input_blocks.1.1.proj_in.weight"], r=8, alpha=4.0
        ),
        conv: _module(v1[conv], r=2, alpha=1.0),
    }
    path = save_lora(tmp_path / "m.safetensors", mods, v1, metadata={"ss_output_name": "m"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 2, "conv_alpha": 1.0}
    assert meta["ss_output_name"] == "m"
    back = load_lora(path, v1)
    assert back.made_for == "SD v1" and back.modules[conv].scale == 0.5


@pytest.mark.parametrize(
    "tensors, key",
    [
        ({"emb_params": torch.ones(2, 768)}, "emb_params"),
        ({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}, "clip_"),
        ({"<cat-toy>": torch.ones(768)}, "<cat-toy>"),
    ],
    ids=["a1111", "sdxl", "diffusers"],
)
def test_an_embedding_given_as_a_lora_is_sent_to_embedding(tmp_path, v1, tensors, key):
    path = tmp_path / "emb.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match=rf"emb.safetensors is a textual-inversion embedding, not "
                       rf"a LoRA \(key `{key}.*\): pass it with --embedding emb.safetensors"):  # fmt: skip
        load_lora(path, v1)


def test_an_a1111_pt_embedding_given_as_a_lora_is_sent_to_embedding(tmp_path, v1):
    """Its nested dicts hold no flat state dict: the reader's refusal still names the kind."""
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(2, 768)},
         "name": "tok", "step": 10},
        tmp_path / "tok.pt",
    )  # fmt: skip
    with pytest.raises(LoraError, match="tok.pt is a textual-inversion embedding.*--embedding"):
        load_lora(tmp_path / "tok.pt", v1)


def test_unknown_small_files_keep_the_generic_refusal(tmp_path, v1):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraError, match="not a LoRA file we know"):
        load_lora(tmp_path / "x.safetensors", v1)
