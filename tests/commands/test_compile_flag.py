"""``--compile [BACKEND]`` on the sampling commands: the U-Net goes through torch.compile, the
images are the eager ones, the first batch's time (with the compilation) is logged apart, and an
unknown backend is an error before any model work."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import build_tiny, tiny_ldm_config

from ldm.checkpoint.prune import save_state_dict
from ldm.commands import sample
from ldm.commands.pngmeta import read_params
from ldm.engine import compilation

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = tiny_ldm_config()
    return save_state_dict(
        build_tiny(cfg).state_dict(), tmp_path_factory.mktemp("run") / "last.ckpt", config=cfg
    )


def _flags(ckpt: Path, outdir: Path) -> list[str]:
    return [
        "--ckpt", str(ckpt), "--prompt", "a red square", "--n_samples", "1", "--n_iter", "2",
        "--sampler", "ddim", "--steps", "2", "--scale", "2", "--seed", "3", "--skip_grid",
        "--precision", "full", "--outdir", str(outdir),
    ]  # fmt: skip


def test_compile_flag_compiles_the_unet_and_keeps_the_images(
    ckpt, tmp_path, monkeypatch, caplog
) -> None:
    compiled = []
    real = compilation.compile_network

    def spy(network, options):
        real(network, options)
        compiled.append((type(network).__name__, dict(options), network._compiled_call_impl))

    monkeypatch.setattr(compilation, "compile_network", spy)
    eager = sample.run("txt2img", _flags(ckpt, tmp_path / "eager"))
    assert compiled == []
    with caplog.at_level(logging.INFO, logger="ldm.commands.sample"):
        dynamo = sample.run("txt2img", [*_flags(ckpt, tmp_path / "c"), "--compile", "eager"])
    assert len(compiled) == 1
    name, options, impl = compiled[0]
    assert name == "UNetModel" and options == {"backend": "eager"} and impl is not None
    assert read_params(dynamo[0])["compile"] == "eager"
    assert "compile" not in read_params(eager[0])
    assert len(eager) == len(dynamo) == 2
    for a, b in zip(eager, dynamo):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    timings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
    assert len(timings) == 2
    assert timings[0].endswith("(includes compiling the U-Net)")
    assert not timings[1].endswith(")")


def test_compile_flag_default_backend_and_unknown_backend(ckpt, tmp_path, monkeypatch) -> None:
    parser = sample.build_parser("txt2img")
    assert parser.parse_args(["--ckpt", "x", "--compile"]).compile == "inductor"
    assert parser.parse_args(["--ckpt", "x"]).compile is None
    with pytest.raises(sample.CommandError, match=r"--compile inductr: unknown torch.compile"):
        sample.run("txt2img", [*_flags(ckpt, tmp_path / "bad"), "--compile", "inductr"])
    assert not (tmp_path / "bad").exists()


def test_inductor_freezes_the_weights_only_while_sampling() -> None:
    from torch._inductor import config as inductor_config

    before = inductor_config.freezing
    with sample._compile_settings("inductor"):
        assert inductor_config.freezing is True
    assert inductor_config.freezing == before
    for backend in ("eager", None):
        with sample._compile_settings(backend):
            assert inductor_config.freezing == before


@pytest.mark.slow
def test_inductor_compile_end_to_end_through_the_command(ckpt, tmp_path, caplog) -> None:
    """The default backend for real: inductor (C++ codegen, weights frozen while sampling)."""
    eager = sample.run("txt2img", _flags(ckpt, tmp_path / "eager"))
    with caplog.at_level(logging.INFO, logger="ldm.commands.sample"):
        compiled = sample.run("txt2img", [*_flags(ckpt, tmp_path / "c"), "--compile"])
    assert read_params(compiled[0])["compile"] == "inductor"
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        ours = np.asarray(Image.open(b)).astype(int)
        ref = np.asarray(Image.open(a)).astype(int)
        # inductor reorders float sums; 8-bit images may differ by a rounding step or two
        assert np.abs(ours - ref).max() <= 2
        assert ours.std() > 0
    timings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
    assert timings[0].endswith("(includes compiling the U-Net)") and len(timings) == 2
