"""Embedding files: A1111 .pt / .safetensors, SDXL clip_l + clip_g, diffusers; safe loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.adapters.embeddings_file import (
    ANY_ENCODER,
    read_embeddings,
    sibling_path,
    write_embeddings,
)
from ldm.checkpoint.safe_load import UnsafeCheckpointError


def _vec(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_a1111_pt_as_webui_writes_it(tmp_path):
    """The dict A1111's Embedding.save writes: token from the file stem, step kept."""
    vec = _vec(3, 768)
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "other",
         "step": 1500, "sd_checkpoint": "abcd", "sd_checkpoint_name": "v1-5"},
        tmp_path / "purple-style.pt",
    )  # fmt: skip
    (item,) = read_embeddings(tmp_path / "purple-style.pt")
    assert (item.token, item.format, item.step) == ("purple-style", "a1111", 1500)
    assert torch.equal(item.vectors[ANY_ENCODER], vec)
    (item,) = read_embeddings(tmp_path / "purple-style.pt", token="<mine>")
    assert item.token == "<mine>"


def test_original_textual_inversion_parameter_dict(tmp_path):
    """rinongal/textual_inversion stored an nn.ParameterDict; it loads without unpickling code."""
    vec = _vec(2, 768)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params},
               tmp_path / "old.pt")  # fmt: skip
    (item,) = read_embeddings(tmp_path / "old.pt")
    assert torch.equal(item.vectors[ANY_ENCODER], vec) and not item.vectors["*"].requires_grad


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        read_embeddings(tmp_path / "evil.pt")


def test_a1111_safetensors_and_sdxl(tmp_path):
    vec = _vec(4, 1024)
    save_file({"emb_params": vec}, str(tmp_path / "neg.safetensors"))
    (item,) = read_embeddings(tmp_path / "neg.safetensors")
    assert item.token == "neg" and torch.equal(item.vectors[ANY_ENCODER], vec)
    assert item.describe() == "SD v2 (OpenCLIP ViT-H, 1024)"
    clip_l, clip_g = _vec(2, 768), _vec(2, 1280, 1)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl.safetensors"))
    (item,) = read_embeddings(tmp_path / "xl.safetensors")
    assert item.format == "a1111-sdxl" and item.describe() == "SDXL (clip_l 768 + clip_g 1280)"
    assert torch.equal(item.vectors["clip_l"], clip_l) and torch.equal(
        item.vectors["clip_g"], clip_g
    )


def test_diffusers_files(tmp_path):
    """{token: [d]} (one vector) or {token: [n, d]}; several tokens per file."""
    one, many = _vec(1, 768)[0], _vec(3, 768, 1)
    save_file({"<cat-toy>": one, "<style>": many}, str(tmp_path / "learned_embeds.safetensors"))
    items = read_embeddings(tmp_path)  # a folder: learned_embeds.* inside
    assert [i.token for i in items] == ["<cat-toy>", "<style>"]
    assert torch.equal(items[0].vectors["*"], one[None]) and torch.equal(
        items[1].vectors["*"], many
    )
    with pytest.raises(ValueError, match="exactly one"):
        read_embeddings(tmp_path / "learned_embeds.safetensors", token="<x>")
    torch.save({"<bin>": one}, tmp_path / "concept.bin")
    (item,) = read_embeddings(tmp_path / "concept.bin")
    assert item.token == "<bin>" and item.format == "diffusers"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a1111_round_trip(tmp_path, suffix):
    vec = _vec(2, 768)
    (path,) = write_embeddings(tmp_path / f"<p>{suffix}", {"<p>": {"*": vec}}, step=7)
    (item,) = read_embeddings(path)
    assert item.token == "<p>" and torch.equal(item.vectors["*"], vec)
    if suffix == ".pt":  # the keys A1111 reads, loadable by a weights-only torch.load
        data = torch.load(path, weights_only=True)
        assert data["string_to_token"] == {"*": 265} and data["step"] == 7 and data["name"] == "<p>"
    else:
        assert set(load_file(str(path))) == {"emb_params"}


def test_sdxl_round_trips(tmp_path):
    parts = {"clip_l": _vec(2, 768), "clip_g": _vec(2, 1280, 1)}
    (path,) = write_embeddings(tmp_path / "xl.safetensors", {"xl": parts})
    assert set(load_file(str(path))) == {"clip_l", "clip_g"}
    paths = write_embeddings(tmp_path / "learned_embeds.safetensors", {"<t>": parts}, "diffusers")
    assert [p.name for p in paths] == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    assert sibling_path(tmp_path / "learned_embeds-steps-500.bin").name == (
        "learned_embeds_2-steps-500.bin"
    )
    (item,) = read_embeddings(paths[0])  # the second file is found and paired
    assert item.format == "diffusers-sdxl" and item.paths == paths
    assert all(torch.equal(item.vectors[k], parts[k]) for k in parts)


def test_refusals_name_the_file_and_the_formats(tmp_path):
    save_file({"weight": _vec(2, 4)[None]}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="lora.safetensors.*\\[n_vectors, width\\]"):
        read_embeddings(tmp_path / "lora.safetensors")
    torch.save({"step": 3, "state": "x"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt is not a textual-inversion.*emb_params"):
        read_embeddings(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="one embedding each|one token per file|folder"):
        write_embeddings(tmp_path / "two.pt", {"a": {"*": _vec(1, 8)}, "b": {"*": _vec(1, 8)}})


@pytest.mark.parametrize(
    "keys",
    [
        ["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"],  # kohya, alpha first
        ["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"],
        ["unet.conv_out.lora_A.weight", "unet.conv_out.lora_B.weight"],  # diffusers / peft
        ["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight"],  # older
    ],
    ids=["kohya-alpha", "kohya", "diffusers", "diffusers-attn-processor"],
)
def test_a_lora_given_as_an_embedding_is_sent_to_lora(tmp_path, keys):
    save_file({k: _vec(2, 768) for k in keys}, str(tmp_path / "style.safetensors"))
    with pytest.raises(ValueError, match=r"style.safetensors is a LoRA file, not a textual-"
                       r"inversion embedding \(key .*\): pass it with --lora .*\[:SCALE\]"):  # fmt: skip
        read_embeddings(tmp_path / "style.safetensors")


def test_lora_a_factors_of_text_width_are_not_read_as_tokens(tmp_path):
    """A diffusers LoRA holding only `lora_A` [r, 768] factors: once read as one token each."""
    keys = [f"unet.down_blocks.0.attentions.0.transformer_blocks.{i}.attn2.to_k.lora_A.weight"
            for i in range(3)]  # fmt: skip
    save_file(
        {k: _vec(4, 768, seed=i) for i, k in enumerate(keys)}, str(tmp_path / "a.safetensors")
    )
    with pytest.raises(ValueError, match="is a LoRA file, not a textual-inversion embedding"):
        read_embeddings(tmp_path / "a.safetensors")
