"""The personalisation configs through main.py on a (random-weight) shapes base: LoRA (with
resume), textual inversion and DreamBooth write their files; the files load for sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.launch import run
from ldm.launch_cli import parse_command
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "personalise"
SMALL = [
    "--no-test",
    "--trainer.max_steps",
    "2",
    "data.params.batch_size=4",
    "lightning.callbacks.shapes_evaluation.params.n_per_split=1",
    "lightning.callbacks.shapes_evaluation.params.steps=2",
    "lightning.callbacks.image_logger.params.disabled=true",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A shapes model of configs/txt2img.yaml with random weights and an EMA, as a file."""
    cfg = OmegaConf.load(ROOT / "configs" / "txt2img.yaml")
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    with torch.no_grad():  # no zero-initialised layers: every weight reaches the output
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, p in model.model.named_parameters():
            getattr(model.model_ema, model.model_ema.m_name2s_name[name]).copy_(p)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _run(config: str, base: Path, logdir: Path, *extra: str):
    argv = ["--base", str(CONFIGS / config), "-t", "-l", str(logdir), *SMALL]
    return run(parse_command([*argv, f"model.params.ckpt_path={base}", *extra]).spec)


def test_lora_run_exports_a_kohya_file_and_resumes(base: Path, tmp_path: Path) -> None:
    from ldm.checkpoint import load_model

    result = _run(
        "shapes-purple-lora.yaml",
        base,
        tmp_path,
        f"data.params.train.params.class_dir={tmp_path / 'class'}",
        "data.params.train.params.num_class_images=4",
        "lightning.callbacks.dreambooth_class_images.params.steps=2",
    )
    lora = result.run_dir / "adapters" / "purple-lora.safetensors"
    keys = list(load_file(str(lora)))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    ckpt = torch.load(result.last_ckpt, weights_only=False)
    assert all(".lora_" in k or k.startswith("model_ema.") for k in ckpt["state_dict"])
    assert (result.run_dir / "final_scores.json").exists()  # judged with purple prompts too
    resumed = run(
        parse_command(
            ["-r", str(result.run_dir), "-t", "--no-test", "--trainer.max_steps", "3"]
        ).spec
    )
    assert resumed.global_step == 3
    with pytest.raises(ValueError, match="checkpoint of an adapter run"):
        load_model(str(result.last_ckpt))
    model = load_model(str(base), config=str(ROOT / "configs" / "txt2img.yaml"))
    with torch.no_grad():
        plain = model.generate(
            ["a small purple circle in the top"], steps=2, seed=1, output="tensor"
        )
        tuned = model.generate(
            ["a small purple circle in the top"],
            steps=2,
            seed=1,
            output="tensor",
            loras=[(str(lora), 1.0)],
        )
        zero = model.generate(
            ["a small purple circle in the top"], steps=2, seed=1, output="tensor",
            loras=[f"{lora}:0"],
        )  # fmt: skip
    assert torch.equal(zero, plain)  # scale 0 is no LoRA
    assert not torch.equal(tuned, plain)


def test_textual_inversion_run_exports_an_a1111_embedding(base: Path, tmp_path: Path) -> None:
    result = _run("shapes-purple-ti.yaml", base, tmp_path)
    (emb,) = (result.run_dir / "adapters").iterdir()
    assert emb.name == "purple-ti.pt"
    data = torch.load(emb, weights_only=True)
    assert data["string_to_param"]["*"].shape == (1, 128)


def test_dreambooth_run_makes_class_images_first(base: Path, tmp_path: Path) -> None:
    class_dir = tmp_path / "class"
    result = _run(
        "shapes-purple-dreambooth.yaml",
        base,
        tmp_path,
        f"data.params.train.params.class_dir={class_dir}",
        "data.params.train.params.num_class_images=4",
        "lightning.callbacks.dreambooth_class_images.params.steps=2",
    )
    assert len(list(class_dir.glob("*.png"))) == 4
    assert result.global_step == 2
