"""txt2img with --lora PATH[:SCALE] and --embedding PATH: applied, recorded with hashes, undone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny, tiny_ldm_config  # noqa: E402

from ldm.adapters.embeddings_file import write_embeddings
from ldm.adapters.lora_io import save_lora
from ldm.adapters.lora_weights import LoraModule
from ldm.checkpoint.prune import save_state_dict
from ldm.commands.pngmeta import read_params
from ldm.commands.sample import main, run
from ldm.util import file_hash

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    cfg = tiny_ldm_config()
    model = build_tiny(cfg)
    ckpt = save_state_dict(model.state_dict(), root / "last.ckpt", config=cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    modules = {}
    for key, shape in shapes.items():
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight", "attn1.to_q.weight")):
            out_f, in_f = shape
            modules[key] = LoraModule(
                down=torch.randn(2, in_f, generator=g),
                up=torch.randn(out_f, 2, generator=g),
                alpha=1.0,
            )
    lora = save_lora(root / "style.safetensors", modules, shapes, format="kohya")
    (emb,) = write_embeddings(root / "mytok.pt", {"mytok": {"*": torch.randn(1, 32, generator=g)}})
    return {"ckpt": ckpt, "lora": lora, "emb": emb}


def _flags(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(files["ckpt"]), "--prompt", "a mytok square", "--steps", "3",
            "--n_samples", "1", "--n_iter", "1", "--seed", "7", "--device", "cpu",
            "--outdir", str(out), "--skip_grid", *extra]  # fmt: skip


def _pixels(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path)).copy())


def test_lora_and_embedding_flags_change_the_image_and_are_recorded(files, tmp_path) -> None:
    (plain,) = run("txt2img", _flags(files, tmp_path / "plain"))
    lora_flag = f"{files['lora']}:0.7"
    (tuned,) = run(
        "txt2img",
        _flags(files, tmp_path / "tuned", "--lora", lora_flag, "--embedding", str(files["emb"])),
    )
    (zero,) = run("txt2img", _flags(files, tmp_path / "zero", "--lora", f"{files['lora']}:0"))
    assert not torch.equal(_pixels(tuned), _pixels(plain))
    assert torch.equal(_pixels(zero), _pixels(plain))  # scale 0 is no LoRA
    params = read_params(tuned)
    assert params["loras"] == [{"name": "style", "scale": 0.7, "hash": file_hash(files["lora"])}]
    assert params["embeddings"] == [{"name": "mytok", "hash": file_hash(files["emb"])}]
    assert params["Lora hashes"] == f"style: {file_hash(files['lora'])}"
    # the same image from the Python API
    from ldm.checkpoint import load_model

    model = load_model(str(files["ckpt"]))
    image = model.generate(
        "a mytok square", steps=3, seed=7, loras=[(str(files["lora"]), 0.7)],
        embeddings=[str(files["emb"])], guidance_scale=params["scale"], sampler=params["sampler"],
        output="pil",
    )[0]  # fmt: skip
    import numpy as np

    assert torch.equal(torch.from_numpy(np.asarray(image).copy()), _pixels(tuned))
    # the model is itself again afterwards: no added token, original weights
    emb = model.cond_stage_model.transformer.get_input_embeddings().weight
    assert emb.shape[0] == 49408


def test_bad_adapter_flags_exit_with_a_message(files, tmp_path, capsys) -> None:
    assert main("txt2img", _flags(files, tmp_path / "x", "--lora", "missing.safetensors")) == 2
    assert "--lora missing.safetensors: no such file" in capsys.readouterr().err
    bad = tmp_path / "sdxl.safetensors"
    from safetensors.torch import save_file

    save_file(
        {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2)},
        str(bad),
    )  # fmt: skip
    assert main("txt2img", _flags(files, tmp_path / "y", "--lora", str(bad))) == 2
    assert "SDXL" in capsys.readouterr().err


def test_a_file_given_to_the_other_flag_or_a_bad_scale_is_named(files, tmp_path, capsys) -> None:
    lora, emb = str(files["lora"]), str(files["emb"])
    assert main("txt2img", _flags(files, tmp_path / "a", "--lora", f"{lora}:abc")) == 2
    assert f"scale 'abc' after {lora} is not a number" in capsys.readouterr().err
    assert main("txt2img", _flags(files, tmp_path / "b", "--embedding", lora)) == 2
    assert "is a LoRA file, not a textual-inversion embedding" in capsys.readouterr().err
    assert main("txt2img", _flags(files, tmp_path / "c", "--lora", emb)) == 2
    assert "mytok.pt is a textual-inversion embedding, not a LoRA" in capsys.readouterr().err


def test_adapter_flags_are_checked_before_the_model_loads(files, tmp_path, capsys, monkeypatch):
    from ldm.commands import sample

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(sample, "_load", no_load)
    lora = str(files["lora"])
    assert main("txt2img", _flags(files, tmp_path / "a", "--lora", f"{lora}:abc")) == 2
    assert f"scale 'abc' after {lora} is not a number" in capsys.readouterr().err
    assert main("txt2img", _flags(files, tmp_path / "b", "--lora", "nope.safetensors")) == 2
    assert "--lora nope.safetensors: no such file" in capsys.readouterr().err
    assert main("txt2img", _flags(files, tmp_path / "c", "--embedding", "nope.pt")) == 2
    assert "--embedding nope.pt: no such file" in capsys.readouterr().err
