"""SDXL from the command line: base + refiner hand-off, micro-conditioning flags, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny, tiny_ldm_config
from tiny_sdxl import build_tiny_sdxl, tiny_sdxl_config

from ldm.checkpoint.prune import save_state_dict
from ldm.commands.pngmeta import read_params
from ldm.commands.sample import main, run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl")
    out = {}
    for name, refiner in (("base", False), ("refiner", True)):
        model = build_tiny_sdxl(refiner=refiner, seed=2 if refiner else 1)
        out[name] = save_state_dict(
            model.state_dict(), root / f"{name}.safetensors", config=tiny_sdxl_config(refiner)
        )
    return out


def _flags(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(files["base"]), "--prompt", "a red cube", "--sampler", "euler",
            "--steps", "6", "--scale", "4", "--n_samples", "1", "--n_iter", "1", "--seed", "3",
            "--H", "32", "--W", "32", "--device", "cpu", "--outdir", str(out), "--skip_grid",
            *extra]  # fmt: skip


def test_refiner_hand_off_from_the_command_line(files, tmp_path: Path) -> None:
    paths = run(
        "txt2img",
        _flags(files, tmp_path, "--refiner", str(files["refiner"]), "--refiner-switch", "0.7",
               "--original-size", "64", "64", "--crop", "0", "8", "--aesthetic-score", "7"),
    )  # fmt: skip
    assert len(paths) == 1
    params = read_params(paths[0])
    assert params["refiner"] == "refiner.safetensors" and float(params["refiner_switch"]) == 0.7
    got = np.asarray(Image.open(paths[0]), dtype=np.float32) / 255

    from ldm import load_model

    base, ref = load_model(files["base"]), load_model(files["refiner"])
    kw = {"sampler": "euler", "steps": 6, "guidance_scale": 4.0, "seed": 3,
          "original_size": (64, 64), "crops_coords_top_left": (0, 8)}  # fmt: skip
    lat = base.generate(["a red cube"], height=32, width=32, output="latent",
                        denoising_end=0.7, **kw)  # fmt: skip
    img = ref.generate(["a red cube"], x_T=lat, denoising_start=0.7, output="tensor",
                       aesthetic_score=7.0, **kw)[0]  # fmt: skip
    want = img.permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
    # without the refiner the image differs (the refiner did the last part)
    alone = base.generate(["a red cube"], height=32, width=32, output="tensor", **kw)[0]
    assert np.abs(alone.permute(1, 2, 0).numpy() - want).max() > 0.02


def test_micro_conditioning_flags_change_the_image(files, tmp_path: Path) -> None:
    a = run("txt2img", _flags(files, tmp_path / "a"))[0]
    b = run("txt2img", _flags(files, tmp_path / "b", "--original-size", "256", "128"))[0]
    pa, pb = (np.asarray(Image.open(p), dtype=np.float32) for p in (a, b))
    assert np.abs(pa - pb).max() > 2
    assert read_params(b)["original_size"] in ([256, 128], "[256, 128]", (256, 128))


def test_flags_a_model_does_not_take_are_refused(files, tmp_path: Path, capsys) -> None:
    cfg = tiny_ldm_config()
    sd15 = save_state_dict(build_tiny(cfg).state_dict(), tmp_path / "sd.ckpt", config=cfg)
    flags = _flags(files, tmp_path / "c", "--original-size", "64", "64")
    flags[1] = str(sd15)
    assert main("txt2img", flags) == 2
    assert "--original-size" in capsys.readouterr().err
    assert main("txt2img", _flags(files, tmp_path / "d", "--aesthetic-score", "5")) == 2
    with pytest.raises(SystemExit) as exit_:  # out of range: refused when the flags are parsed
        main("txt2img", _flags(files, tmp_path / "e", "--refiner-switch", "1.5"))
    assert exit_.value.code == 2 and "--refiner-switch" in capsys.readouterr().err


def test_img2img_with_sdxl(files, tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(init)
    paths = run("img2img", [*_flags(files, tmp_path / "i"), "--init-img", str(init),
                            "--strength", "0.5"])  # fmt: skip
    assert Image.open(paths[0]).size == (32, 32)


def test_inpaint_with_refiner_keeps_the_known_region(files, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(init)
    m = np.zeros((32, 32), dtype="uint8")
    m[:, 16:] = 255  # repaint the right half
    Image.fromarray(m).save(mask)
    paths = run("inpaint", [*_flags(files, tmp_path / "p"), "--init-img", str(init), "--mask",
                            str(mask), "--refiner", str(files["refiner"])])  # fmt: skip
    assert Image.open(paths[0]).size == (32, 32)
    # the refiner keeps the known region: whatever latent the base hands over, the refiner's
    # result there is the encoded init image (latent grid 8 x 8: left 4 columns kept)
    from ldm import load_model

    base, ref = load_model(files["base"]), load_model(files["refiner"])
    kw = {"sampler": "euler", "steps": 6, "guidance_scale": 4.0, "init_image": init,
          "mask": mask, "output": "latent"}  # fmt: skip
    outs = []
    for seed in (1, 2):
        lat = base.generate(["a red cube"], seed=seed, denoising_end=0.7, **kw)
        outs.append(ref.generate(["a red cube"], seed=5, x_T=lat, denoising_start=0.7, **kw))
    assert torch.equal(outs[0][..., :4], outs[1][..., :4])
    assert not torch.allclose(outs[0][..., 4:], outs[1][..., 4:])


def test_sdxl_embedding_conditions_the_refiner_too(files, tmp_path: Path, monkeypatch) -> None:
    """An SDXL embedding's clip_g part reaches the refiner's OpenCLIP encoder (A1111, diffusers):
    the refiner encodes the prompt with the token's vectors, the image equals the API's."""
    from safetensors.torch import save_file

    from ldm import load_model
    from ldm.adapters.embeddings_loader import load_embeddings
    from ldm.commands import sample

    g = torch.Generator().manual_seed(5)
    emb = tmp_path / "xltok.safetensors"
    save_file({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)},
              str(emb))  # fmt: skip
    seen: list[set[str]] = []
    real_load = sample._load

    def load(args, flag, device, **kw):  # noqa: ANN001, ANN003, ANN202
        model = real_load(args, flag, device, **kw)
        if flag == "--refiner":
            encoder = model.conditioner.embedders[0]
            real_generate = model.generate

            def generate(*a, **k):  # noqa: ANN002, ANN003, ANN202
                seen.append(set(encoder.tokenizer.added_tokens))
                return real_generate(*a, **k)

            model.generate = generate
        return model

    monkeypatch.setattr(sample, "_load", load)
    flags = _flags(files, tmp_path / "cli", "--refiner", str(files["refiner"]),
                   "--refiner-switch", "0.5", "--embedding", str(emb))  # fmt: skip
    flags[flags.index("--prompt") + 1] = "a xltok cube"
    got = np.asarray(Image.open(run("txt2img", flags)[0]), dtype=np.float32) / 255
    assert seen == [{"xltok"}]

    base, ref = load_model(files["base"]), load_model(files["refiner"])
    kw = {"sampler": "euler", "steps": 6, "guidance_scale": 4.0, "seed": 3}
    with load_embeddings(base, [emb]):
        lat = base.generate(["a xltok cube"], height=32, width=32, output="latent",
                            denoising_end=0.5, **kw)  # fmt: skip
    with load_embeddings(ref, [emb]):
        img = ref.generate(["a xltok cube"], x_T=lat, denoising_start=0.5, output="tensor",
                           **kw)[0]  # fmt: skip
    assert np.abs(got - img.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6
