"""Sampling precision: the default (bf16 on a CPU with native bf16, fp32 otherwise, fp16 on CUDA),
``full`` unchanged fp32, bf16 close to fp32, the VAE decoding in fp32 whatever the precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny, tiny_ldm_config

import ldm
from ldm.checkpoint.prune import save_state_dict
from ldm.commands.pngmeta import read_params
from ldm.commands.sample import run
from ldm.engine import precision as P
from ldm.engine.defaults import check_sampling_defaults, defaults_from_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"sampler": "dpmpp_2m", "steps": 4, "guidance_scale": 3.0, "seed": 5}
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = tiny_ldm_config()
    return save_state_dict(
        build_tiny(cfg).state_dict(), tmp_path_factory.mktemp("run") / "last.ckpt", config=cfg
    )


@pytest.fixture(scope="module")
def model(ckpt):
    return ldm.load_model(ckpt, device="cpu")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(P.ENV_PRECISION, raising=False)


@pytest.mark.parametrize("fast", [True, False])
def test_default_is_bf16_on_a_bf16_cpu_else_fp32(monkeypatch, no_env, fast: bool) -> None:
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: fast)
    cpu = torch.device("cpu")
    want = torch.bfloat16 if fast else torch.float32
    for name in (None, "autocast", "auto"):
        assert P.resolve_dtype(name, cpu) == want
    # a small network stays in fp32 on the CPU (bf16 measured slower there), not on CUDA
    assert P.resolve_dtype(None, cpu, params=P.BF16_MIN_PARAMS - 1) == torch.float32
    assert P.resolve_dtype(None, cpu, params=P.BF16_MIN_PARAMS) == want
    assert P.resolve_dtype("bf16", cpu, params=10) == torch.bfloat16
    assert P.resolve_dtype(None, torch.device("cuda"), params=10) == torch.float16
    assert P.resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert P.resolve_dtype(None, torch.device("mps")) == torch.float32
    for name, dtype in (("full", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        assert P.resolve_dtype(name, cpu) == dtype
    monkeypatch.setenv(P.ENV_PRECISION, "full")
    assert P.resolve_dtype(None, cpu) == torch.float32
    with pytest.raises(ValueError, match="half"):
        P.resolve_dtype("half", cpu)


def test_bf16_detection_agrees_with_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo")
    if not flags.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    words = set(flags.read_text().split())
    native = bool({"amx_tile", "avx512_bf16"} & words) and torch.backends.mkldnn.is_available()
    assert P.cpu_has_fast_bf16() == native


def _spy(model):
    """Record (autocast on?, input dtype) of the U-Net and of the VAE decoder calls."""
    seen: dict[str, list] = {"unet": [], "decoder": []}

    def hook(name):
        def fn(_mod, args, out):
            seen[name].append((torch.is_autocast_enabled("cpu"), args[0].dtype, out.dtype))

        return fn

    handles = [
        model.model.register_forward_hook(hook("unet")),
        model.first_stage_model.decoder.register_forward_hook(hook("decoder")),
    ]
    return seen, handles


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a8, b8 = ((x * 255).round().double() for x in (a, b))
    return float(10 * torch.log10(255.0**2 / ((a8 - b8) ** 2).mean()))


def test_bf16_runs_the_unet_in_bf16_decodes_in_fp32_and_stays_close(model) -> None:
    seen, handles = _spy(model)
    try:
        full = model.generate(PROMPTS, output="tensor", precision="full", **SETTINGS)
        calls_full = {k: list(v) for k, v in seen.items()}
        for v in seen.values():
            v.clear()
        bf16 = model.generate(PROMPTS, output="tensor", precision="bf16", **SETTINGS)
    finally:
        for h in handles:
            h.remove()
    # fp32: no autocast anywhere
    assert {c[0] for c in calls_full["unet"]} == {False}
    assert {c[2] for c in calls_full["unet"]} == {torch.float32}
    # bf16: the U-Net under bf16 autocast (its output bf16), the decoder in fp32, autocast off
    assert {c[0] for c in seen["unet"]} == {True}
    assert {c[2] for c in seen["unet"]} == {torch.bfloat16}
    assert seen["decoder"] and all(
        c == (False, torch.float32, torch.float32) for c in seen["decoder"]
    )
    assert bf16.dtype == torch.float32
    # close to fp32, but not the fp32 path: a broken cast (garbage, fp32 weights lost) fails
    assert not torch.equal(bf16, full)
    assert _psnr(bf16, full) > 30.0


def test_full_is_the_fp32_path_unchanged(model, monkeypatch, no_env) -> None:
    """precision="full" equals the default on a CPU without bf16 (what every CPU got before)."""
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    before = model.generate(PROMPTS, output="tensor", **SETTINGS)
    full = model.generate(PROMPTS, output="tensor", precision="full", **SETTINGS)
    assert torch.equal(before, full)
    # the fixed-seed fp32 images of the checkpoint's whole pipeline are pinned elsewhere
    # (tests/engine/test_generate.py, the parity tests): they run with LDM_PRECISION=full


def test_recorded_precision_is_the_default(model, tmp_path) -> None:
    assert check_sampling_defaults({"precision": "BF16"}) == {"precision": "bf16"}
    with pytest.raises(ValueError, match="sampling_defaults.precision"):
        check_sampling_defaults({"precision": "int8"})
    saved = dict(model.sampling_defaults or {})
    try:
        model.sampling_defaults = {**saved, "precision": "bf16"}
        assert P.model_dtype(model) == torch.bfloat16
        recorded = model.generate(PROMPTS, output="tensor", **SETTINGS)
    finally:
        model.sampling_defaults = saved
    named = model.generate(PROMPTS, output="tensor", precision="bf16", **SETTINGS)
    assert torch.equal(recorded, named)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "final_scores.json").write_text(
        json.dumps({"sampling": {"sampler": "ddim", "steps": 3, "precision": "bf16", "seed": 0}})
    )
    rec = defaults_from_run_dir(run_dir / "checkpoints" / "last.ckpt")
    assert rec["precision"] == "bf16" and "options" not in rec


def test_command_default_precision_and_full_flag(ckpt, model, tmp_path, monkeypatch, no_env):
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    assert P.model_dtype(model) == torch.float32  # the tiny model is below the size floor
    monkeypatch.setattr(P, "BF16_MIN_PARAMS", 0)  # as if it were SD-sized
    flags = [
        "--ckpt",
        str(ckpt),
        "--prompt",
        PROMPTS[0],
        "--n_samples",
        "1",
        "--n_iter",
        "1",
        "--sampler",
        "dpmpp_2m",
        "--steps",
        "4",
        "--scale",
        "3",
        "--seed",
        "5",
        "--skip_grid",
    ]
    default = run("txt2img", [*flags, "--outdir", str(tmp_path / "d")])
    full = run("txt2img", [*flags, "--outdir", str(tmp_path / "f"), "--precision", "full"])
    assert read_params(default[0])["precision"] == "bf16"
    assert read_params(full[0])["precision"] == "fp32"
    for path, name in ((default[0], "bf16"), (full[0], "full")):
        ref = model.generate(PROMPTS[0], precision=name, **SETTINGS)[0]
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(ref))
