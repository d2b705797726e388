"""Sampling-command flags: conflicting sampler flags, sampler aliases, odd sizes, Stability's
--bf16 / --repeat and CompVis inpaint's --indir, on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import build_tiny, tiny_ldm_config

from ldm.checkpoint.prune import save_state_dict
from ldm.commands.pngmeta import read_params
from ldm.commands.sample import (
    CommandError,
    build_parser,
    main,
    prompts,
    run,
    sampler_name,
)
from ldm.commands.sample_flags import apply_compat_flags

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = tiny_ldm_config()
    return save_state_dict(
        build_tiny(cfg).state_dict(), tmp_path_factory.mktemp("run") / "last.ckpt", config=cfg
    )


def _flags(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--ckpt", str(ckpt), "--prompt", "a red square", "--steps", "2", "--n_samples", "1"),
        *("--n_iter", "1", "--seed", "3", "--device", "cpu", "--outdir", str(out), *extra),
    ]


def _args(mode: str, *argv: str):  # noqa: ANN202
    args = build_parser(mode).parse_args(["--ckpt", "x", *argv])
    apply_compat_flags(args, mode)
    return args


@pytest.mark.parametrize(
    "argv,found",
    [
        (["--plms", "--dpm_solver"], "--plms (plms) and --dpm_solver (dpmpp_2m)"),
        (["--sampler", "euler", "--plms"], "--sampler euler (euler) and --plms (plms)"),
        (["--sampler", "ddim", "--dpm_solver"], "--sampler ddim (ddim) and --dpm_solver"),
    ],
)
def test_conflicting_sampler_flags_are_refused(argv, found, ckpt, capsys):
    with pytest.raises(CommandError, match="choose different samplers"):
        sampler_name(_args("txt2img", *argv))
    assert main("txt2img", ["--ckpt", str(ckpt), *argv]) == 2
    err = capsys.readouterr().err
    assert found in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv,name",
    [
        (["--plms", "--sampler", "plms"], "plms"),
        (["--plms", "--sampler", "PNDMScheduler"], "PNDMScheduler"),
        (["--dpm_solver", "--sampler", "DPM++ 2M Karras"], "DPM++ 2M Karras"),
        (["--dpm_solver"], "dpmpp_2m"),
        (["--plms"], "plms"),
        ([], None),
    ],
)
def test_agreeing_sampler_flags_are_accepted(argv, name):
    assert sampler_name(_args("txt2img", *argv)) == name


def test_sampler_errors_name_the_flag(ckpt, capsys):
    assert main("txt2img", ["--ckpt", str(ckpt), "--sampler", "eulr_a"]) == 2
    assert "Unknown --sampler 'eulr_a' (did you mean 'euler_a'?)" in capsys.readouterr().err
    assert main("txt2img", ["--ckpt", str(ckpt), "--sampler", "DPM fast"]) == 2
    assert "the closest is 'dpm_adaptive'" in capsys.readouterr().err


def test_a1111_karras_sampler_name_samples_like_karras_flag(ckpt: Path, tmp_path: Path):
    (named,) = run(
        "txt2img", _flags(ckpt, tmp_path / "a", "--sampler", "DPM++ 2M Karras", "--skip_grid")
    )
    (flag,) = run(
        "txt2img", _flags(ckpt, tmp_path / "b", "--sampler", "dpmpp_2m", "--karras", "--skip_grid")
    )
    meta = read_params(named)
    assert meta["sampler"] == "dpmpp_2m" and meta["karras"] is True
    assert np.array_equal(np.asarray(Image.open(named)), np.asarray(Image.open(flag)))


def test_sizes_the_unet_cannot_halve_evenly(ckpt: Path, tmp_path: Path, capsys):
    """f = 2 and one U-Net downsampling: 18 x 14 pixels are 9 x 7 latents (odd sides)."""
    paths = run("txt2img", _flags(ckpt, tmp_path / "o", "--H", "18", "--W", "14", "--skip_grid"))
    with Image.open(paths[0]) as im:
        assert im.size == (14, 18)
    assert main("txt2img", _flags(ckpt, tmp_path / "bad", "--H", "17")) == 2
    assert "--H 17: must be a multiple of 2 (the model's latent factor); use 16 or 18" in (
        capsys.readouterr().err
    )
    assert main("txt2img", _flags(ckpt, tmp_path / "bad", "--f", "8")) == 2
    assert "--f 8: this checkpoint's autoencoder downsamples by 2" in capsys.readouterr().err


def test_bf16_is_precision_bf16_and_conflicts_are_refused(ckpt: Path, tmp_path: Path):
    assert _args("txt2img", "--bf16").precision == "bf16"
    assert _args("txt2img", "--bf16", "--precision", "bf16").precision == "bf16"
    with pytest.raises(CommandError, match="--bf16 and --precision fp16"):
        _args("txt2img", "--bf16", "--precision", "fp16")
    (png,) = run("txt2img", _flags(ckpt, tmp_path / "o", "--bf16", "--skip_grid"))
    assert read_params(png)["precision"] == "bf16"


def test_repeat_repeats_each_prompt_of_the_file(tmp_path: Path):
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    args = _args("txt2img", "--from-file", str(tmp_path / "p.txt"), "--repeat", "3")
    args.n_samples = 4
    assert prompts(args) == [["one", "one", "one", "two"], ["two", "two"]]
    with pytest.raises(CommandError, match="--repeat 2 repeats the prompts of --from-file"):
        _args("txt2img", "--repeat", "2")
    assert _args("txt2img").n_samples == 3 and _args("txt2img").n_iter == 2


def _pair(folder: Path, name: str, size: int = 16) -> None:
    g = np.random.default_rng(len(name))
    folder.mkdir(exist_ok=True)
    Image.fromarray((g.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255
    Image.fromarray(mask).save(folder / f"{name}_mask.png")


def test_inpaint_indir_writes_one_result_per_image(ckpt: Path, tmp_path: Path):
    _pair(tmp_path / "in", "cat")
    _pair(tmp_path / "in", "dog")
    out = tmp_path / "out"
    argv = ["--ckpt", str(ckpt), "--indir", str(tmp_path / "in"), "--outdir", str(out)]
    written = run("inpaint", [*argv, "--steps", "2", "--device", "cpu"])
    assert written == [out / "cat.png", out / "dog.png"]
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "dog.png"]
    with Image.open(out / "cat.png") as im:
        result = np.asarray(im.convert("RGB")).astype(int)
    source = np.asarray(Image.open(tmp_path / "in" / "cat.png")).astype(int)
    # the kept (black) half stays close to the image, the repainted half does not
    kept = np.abs(result[:, :8] - source[:, :8]).mean()
    assert kept < np.abs(result[:, 8:] - source[:, 8:]).mean()


def test_inpaint_indir_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="no masks; expected images X.png with masks X_mask"):
        _args("inpaint", "--indir", str(tmp_path / "empty"))
    _pair(tmp_path / "d", "a")
    Image.new("RGB", (16, 16)).save(tmp_path / "d" / "b.png")
    with pytest.raises(CommandError, match="b.png has no mask; add b_mask.png"):
        _args("inpaint", "--indir", str(tmp_path / "d"))
    (tmp_path / "d" / "b.png").unlink()
    Image.new("L", (16, 16)).save(tmp_path / "d" / "c_mask.png")
    with pytest.raises(CommandError, match="mask c_mask.png has no image c.png"):
        _args("inpaint", "--indir", str(tmp_path / "d"))
    (tmp_path / "d" / "c_mask.png").unlink()
    with pytest.raises(CommandError, match="--indir and --init-img"):
        _args("inpaint", "--indir", str(tmp_path / "d"), "--init-img", "x.png")
    with pytest.raises(CommandError, match="drop --n_samples 2"):
        _args("inpaint", "--indir", str(tmp_path / "d"), "--n_samples", "2")
    with pytest.raises(CommandError, match="needs --init-img IMAGE and --mask MASK"):
        _args("inpaint", "--init-img", "x.png")
    args = _args("inpaint", "--indir", str(tmp_path / "d"))
    assert (args.n_samples, args.n_iter, args.skip_grid) == (1, 1, True)
