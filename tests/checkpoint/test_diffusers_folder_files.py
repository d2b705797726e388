"""diffusers folders as people have them: fp16 variants, sharded weights, foreign SD 2.x and
zero-terminal-SNR schedulers, missing components; read back to the same weights, or refused
with a message naming the part."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tiny_diffusers import tiny_sd_components
from tiny_models import build_tiny, tiny_ldm_config, tsv_state_dict

import ldm
from ldm.checkpoint import diffusers_folder
from ldm.checkpoint.convert import _fill_unused_openclip_layer, from_diffusers, to_diffusers
from ldm.checkpoint.keymap_text import OPENCLIP_PREFIX, hf_to_openclip, openclip_to_hf
from ldm.checkpoint.safe_load import LoadedCheckpoint

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _write_folder(root: Path, zero_snr: bool = False, **save_kw) -> None:
    """A tiny SD folder written by diffusers / transformers themselves (no ldm extras)."""
    unet, vae, text = tiny_sd_components()
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        if save_kw.get("variant") == "fp16":
            module = module.half()
        module.save_pretrained(root / name, **save_kw)
    diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if zero_snr else "epsilon",
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing" if zero_snr else "leading",
    ).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers_folders")
    kinds = {
        "plain": {},
        "fp16": {"variant": "fp16"},
        "sharded": {"max_shard_size": "200KB"},
        "fp16_sharded": {"variant": "fp16", "max_shard_size": "200KB"},
    }
    for name, kw in kinds.items():
        _write_folder(root / name, **kw)
    _write_folder(root / "zero_snr", zero_snr=True)
    return {name: root / name for name in [*kinds, "zero_snr"]}


def test_variant_and_sharded_folders_read_the_same_weights(folders: dict[str, Path]) -> None:
    plain, _ = from_diffusers(folders["plain"])
    files = {n: sorted(p.name for p in (folders[n] / "unet").iterdir()) for n in folders}
    assert "diffusion_pytorch_model.fp16.safetensors" in files["fp16"]
    assert "diffusion_pytorch_model.safetensors.index.json" in files["sharded"]
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in files["fp16_sharded"]
    assert len(files["sharded"]) > 3  # really split into shards
    for name in ("sharded", "fp16", "fp16_sharded"):
        sd, _ = from_diffusers(folders[name])
        assert set(sd) == set(plain), name
        for k, v in plain.items():
            expected = v.half() if name.startswith("fp16") and v.is_floating_point() else v
            assert torch.equal(sd[k], expected), (name, k)


def test_plain_weights_win_over_a_variant(folders: dict[str, Path], tmp_path: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(folders["plain"], both)
    fp16 = folders["fp16"] / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    shutil.copy(fp16, both / "unet")
    files, what = diffusers_folder.weight_files(both / "unet", "diffusion_pytorch_model")
    assert what == "diffusion_pytorch_model.safetensors" and files == [both / "unet" / what]


def test_missing_parts_are_named(folders: dict[str, Path], tmp_path: Path) -> None:
    no_text = tmp_path / "no_text"
    shutil.copytree(folders["plain"], no_text)
    shutil.rmtree(no_text / "text_encoder")
    with pytest.raises(
        FileNotFoundError, match="lists a text_encoder, but there is no text_encoder/"
    ):
        from_diffusers(no_text)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(folders["plain"], no_weights)
    (no_weights / "vae" / "diffusion_pytorch_model.safetensors").rename(
        no_weights / "vae" / "weights.ckpt.part"
    )
    with pytest.raises(FileNotFoundError, match=r"vae: no weights.*holds config.json, weights"):
        from_diffusers(no_weights)

    lost_shard = tmp_path / "lost_shard"
    shutil.copytree(folders["sharded"], lost_shard)
    shard = sorted((lost_shard / "unet").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing from .*{shard.name}"):
        from_diffusers(lost_shard)


def test_foreign_folder_loads_with_its_provenance(folders: dict[str, Path]) -> None:
    model = ldm.load_model(folders["plain"])
    info = model.checkpoint_info
    assert info["detected"] == "diffusers-folder"
    assert "rebuilt from its component configs" in info["reason"]


def test_zero_terminal_snr_maps_both_ways(folders: dict[str, Path], tmp_path: Path) -> None:
    model = ldm.load_model(folders["zero_snr"])
    reference = diffusers.DDIMScheduler.from_pretrained(folders["zero_snr"] / "scheduler")
    assert model.alphas_cumprod[-1].item() == 0.0
    torch.testing.assert_close(
        model.alphas_cumprod.double(), reference.alphas_cumprod.double(), atol=1e-6, rtol=0
    )

    config = tiny_ldm_config()
    config["model"]["params"].update(zero_terminal_snr=True, parameterization="v")
    tiny = build_tiny(config)
    ckpt = LoadedCheckpoint(tmp_path / "z.ckpt", tiny.state_dict(), {"ldm_config": config}, {})
    out = to_diffusers(ckpt, tmp_path / "exported")
    exported = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert exported["rescale_betas_zero_snr"] is True
    assert exported["timestep_spacing"] == "trailing"
    again = diffusers.DDIMScheduler.from_config(exported)
    torch.testing.assert_close(
        again.alphas_cumprod.double(), tiny.alphas_cumprod.double(), atol=1e-6, rtol=0
    )


def test_export_keeps_heads_given_in_a_transformers_config(tmp_path: Path) -> None:
    config = tiny_ldm_config()  # cond_stage_config.params.config.num_attention_heads = 4
    tiny = build_tiny(config)
    ckpt = LoadedCheckpoint(tmp_path / "t.ckpt", tiny.state_dict(), {"ldm_config": config}, {})
    out = to_diffusers(ckpt, tmp_path / "exported")
    text_cfg = json.loads((out / "text_encoder" / "config.json").read_text())
    assert text_cfg["num_attention_heads"] == 4
    reference = transformers.CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    with torch.no_grad():
        ours = tiny.cond_stage_model.transformer(input_ids=ids).last_hidden_state
        theirs = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_foreign_sd2_text_encoder_gets_the_full_openclip_key_set() -> None:
    """diffusers' SD 2.x text_encoder holds 23 layers and no projection head; the SD 2.x key
    list (the release files) has 24 layers, text_projection and logit_scale."""
    reference = tsv_state_dict("sd-v2-text-encoder.tsv")
    text = {k: v for k, v in reference.items() if k.startswith(OPENCLIP_PREFIX)}
    hf, _ = openclip_to_hf(text, keep_layers=23)
    sd = hf_to_openclip(hf)
    assert OPENCLIP_PREFIX + "text_projection" not in sd
    config = {"model": {"params": {"cond_stage_config": {"params": {"layer": "penultimate"}}}}}
    _fill_unused_openclip_layer(sd, config)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        k: tuple(v.shape) for k, v in reference.items() if k.startswith(OPENCLIP_PREFIX)
    }
    assert sd[OPENCLIP_PREFIX + "logit_scale"].item() == pytest.approx(math.log(1 / 0.07))


def test_unsafe_reaches_the_component_reader(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = diffusers_folder.read_checkpoint

    def spy(path, unsafe=False, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append(unsafe)
        return real(path, unsafe=unsafe, **kw)

    monkeypatch.setattr(diffusers_folder, "read_checkpoint", spy)
    ldm.load_model(folders["plain"], unsafe=True)
    assert seen and all(seen)
