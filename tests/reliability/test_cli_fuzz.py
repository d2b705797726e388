"""Random flag values and files given to the sampling commands, ``ldm-convert`` and ``ldm-lora``:
exit code 0, 1 or 2 with one message, never a traceback.

Values are drawn from the edges users hit (0, -1, nan, inf, huge, empty, words for numbers) and
random text; files from a pool of wrong ones (damaged checkpoints, images that are text, folders,
missing paths). The fast tests fuzz the parsers and the checks made before a model loads; the slow
ones run the commands to the end on a tiny checkpoint.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_models import build_tiny, tiny_inpaint_config, tiny_ldm_config

from ldm.atomic_output import PARTIAL_MARK
from ldm.checkpoint.prune import save_state_dict
from ldm.commands import convert, lora, sample

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

EDGE = [
    "-1", "0", "1", "2", "3", "8", "9", "16", "17", "0.5", "1.5", "-0.5", "1e400", "-1e400",
    "nan", "inf", "-inf", "abc", "", " 2", "2.0", "0x10", "1_000", "99999999999999999999",
    "-99999999999999999999", "٣",
]  # fmt: skip
# real command lines cannot hold NUL bytes; lone surrogates are left out too
TEXT = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12
)
VALUES = st.one_of(st.sampled_from(EDGE), TEXT, st.integers(-(2**70), 2**70).map(str))
SAMPLE_NUMBERS = [
    "--steps", "--n_samples", "--n_iter", "--scale", "--ddim_eta", "--H", "--W", "--C", "--f",
    "--seed", "--n_rows", "--attention-slice", "--aesthetic-score", "--refiner-switch",
]  # fmt: skip
SAMPLE_CHOICES = {
    "--sampler": ["ddim", "plms", "euler", "euler_a", "dpmpp_2m", "warp_drive", ""],
    "--precision": ["full", "autocast", "half"],
    "--device": ["cpu", "cuda", "cuda:7", "mps", "tpu", "", "cpu:0"],
    "--prediction": ["eps", "v", "x0"],
}
SAMPLE_SWITCHES = ["--karras", "--fixed_code", "--tiled-decode", "--skip_grid", "--skip_save",
                   "--plms", "--dpm_solver", "--no-ema", "--use-ema"]  # fmt: skip
SAMPLE_FILES = ["--ckpt", "--config", "--from-file", "--lora", "--embedding", "--refiner"]
SIZE_PAIRS = ["--original-size", "--crop", "--target-size"]

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Good and bad files: the tiny checkpoints, and everything a user passes by mistake."""
    d = tmp_path_factory.mktemp("pool")
    cfg = tiny_ldm_config()
    good = save_state_dict(build_tiny(cfg).state_dict(), d / "tiny.ckpt", config=cfg)
    icfg = tiny_inpaint_config()
    inpaint = save_state_dict(build_tiny(icfg).state_dict(), d / "inpaint.ckpt", config=icfg)
    data = good.read_bytes()
    (d / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (d / "empty.safetensors").write_bytes(b"")
    Image.new("RGB", (16, 16), "red").save(d / "image.png")
    (d / "image.ckpt").write_bytes((d / "image.png").read_bytes())
    (d / "text.png").write_text("not an image")
    png = (d / "image.png").read_bytes()
    (d / "cut.png").write_bytes(png[: len(png) // 2])
    (d / "junk.bin").write_bytes(bytes(range(256)) * 4)
    (d / "prompts.txt").write_text("a red square\n\nsecond prompt\n")
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "config.yaml").write_text("model: [unclosed\n")
    (d / "folder").mkdir()
    tuned = save_state_dict(build_tiny(cfg, seed=1).state_dict(), d / "tuned.ckpt", config=cfg)
    argv = ["extract", "--base", str(good), "--tuned", str(tuned), "--rank", "2", "--out"]
    assert lora.main([*argv, str(d / "lora.safetensors")]) == 0
    return {
        "tuned": str(tuned), "lora": str(d / "lora.safetensors"),
        "good": str(good), "inpaint": str(inpaint), "cut": str(d / "cut.ckpt"),
        "empty": str(d / "empty.safetensors"), "image": str(d / "image.png"),
        "image_ckpt": str(d / "image.ckpt"), "text_png": str(d / "text.png"),
        "cut_png": str(d / "cut.png"), "junk": str(d / "junk.bin"),
        "prompts": str(d / "prompts.txt"), "latin1": str(d / "latin1.txt"),
        "config": str(d / "config.yaml"), "folder": str(d / "folder"),
        "missing": str(d / "missing.ckpt"),
    }  # fmt: skip


def _run(fn, argv: list[str], figures: Counter, tag: str) -> int:  # noqa: ANN001
    """Call a command's main; its exit code. Any exception but SystemExit fails the test."""
    figures[f"cli fuzz ({tag}): cases"] += 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = fn(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    text = err.getvalue()
    assert code in (0, 1, 2), f"exit code {code!r} for {argv}"
    assert "Traceback" not in text, text
    if code:
        assert "error:" in text, f"exit {code} without a message for {argv}: {text!r}"
    figures[f"cli fuzz ({tag}): exit {code}"] += 1
    return code


@st.composite
def sample_argv(draw: st.DrawFn, pool: dict[str, str], mode: str, small: bool) -> list[str]:
    ckpt = pool["inpaint"] if mode == "inpaint" else pool["good"]
    argv = ["--ckpt", ckpt, "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--device", "cpu"]
    argv += ["--H", "16", "--W", "16"]
    if mode != "txt2img":
        argv += ["--init-img", pool["image"]]
    if mode == "inpaint":
        argv += ["--mask", pool["image"]]
    values = st.sampled_from(EDGE[:19]) if small else VALUES
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["number", "choice", "switch", "file", "pair", "image", "text"])
        )
        if kind == "number":
            argv += [draw(st.sampled_from(SAMPLE_NUMBERS + ["--strength"])), draw(values)]
        elif kind == "choice":
            flag = draw(st.sampled_from(sorted(SAMPLE_CHOICES)))
            argv += [flag, draw(st.sampled_from(SAMPLE_CHOICES[flag]))]
        elif kind == "switch":
            argv.append(draw(st.sampled_from(SAMPLE_SWITCHES)))
        elif kind == "file":
            argv += [draw(st.sampled_from(SAMPLE_FILES)), pool[draw(st.sampled_from(sorted(pool)))]]
        elif kind == "pair":
            argv += [draw(st.sampled_from(SIZE_PAIRS)), draw(values), draw(values)]
        elif kind == "image":
            flag = draw(st.sampled_from(["--init-img", "--mask"]))
            argv += [flag, pool[draw(st.sampled_from(["image", "text_png", "cut_png", "junk",
                                                      "folder", "missing", "image_ckpt"]))]]  # fmt: skip
        else:
            argv += [draw(st.sampled_from(["--prompt", "--negative-prompt"])), draw(TEXT)]
    return argv


def _checks_only(mode: str):  # noqa: ANN202
    """A sampling command up to the model load: parser, flag ranges, file checks, device."""

    def fn(argv: list[str]) -> int:
        try:
            args = sample.build_parser(mode).parse_args(argv)
            sample.check_inputs(args)
            sample.sampler_name(args)
            sample.pick_device(args.device)
        except sample.CommandError as err:
            return sample.report(f"ldm-{mode}", err, 2)
        return 0

    return fn


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_sampling_flags_are_checked_at_parse_time(mode, pool, figures) -> None:
    @FAST
    @given(sample_argv(pool, mode, small=False))
    def case(argv: list[str]) -> None:
        _run(_checks_only(mode), argv, figures, f"{mode} checks")

    case()


@pytest.mark.parametrize("mode", ["txt2img", "inpaint"])
def test_sampling_commands_end_to_end(mode, pool, figures, tmp_path) -> None:
    """A few whole runs on the tiny model (many under -m slow)."""

    @settings(FAST, max_examples=4)
    @given(sample_argv(pool, mode, small=True))
    def case(argv: list[str]) -> None:
        argv = [*argv, "--outdir", str(tmp_path / "out")]
        _run(lambda a: sample.main(mode, a), argv, figures, f"{mode} runs")

    case()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_sampling_commands_end_to_end_many(mode, pool, figures, tmp_path) -> None:
    @settings(FAST, max_examples=120, derandomize=False)
    @given(sample_argv(pool, mode, small=True))
    def case(argv: list[str]) -> None:
        argv = [*argv, "--outdir", str(tmp_path / "out")]
        _run(lambda a: sample.main(mode, a), argv, figures, f"{mode} runs")

    case()


@st.composite
def tool_argv(draw: st.DrawFn, pool: dict[str, str], out: Path) -> tuple[str, list[str]]:
    good = st.sampled_from([pool["good"], pool["tuned"], pool["lora"]])
    files = st.one_of(good, st.sampled_from(sorted(pool)).map(lambda k: pool[k]))
    dst = draw(st.sampled_from([str(out / "o.safetensors"), str(out / "o.ckpt"), str(out / "diff"),
                                pool["image"] + "/x.safetensors", pool["folder"]]))  # fmt: skip
    tool = draw(st.sampled_from(["convert", "merge", "extract", "info", "lora-convert"]))
    if tool == "convert":
        argv = [draw(files), dst]
        argv += draw(st.sampled_from([[], ["--to", "ckpt"], ["--ema", "use"], ["--fp16"],
                                      ["--to", "diffusers"], ["--prediction", "v"]]))  # fmt: skip
        return tool, argv
    if tool == "merge":
        return tool, ["merge", draw(files), "--lora", f"{draw(files)}:{draw(VALUES)}", "--out", dst]
    if tool == "extract":
        return tool, ["extract", "--base", draw(files), "--tuned", draw(files), "--rank",
                      draw(VALUES), "--clamp-quantile", draw(VALUES), "--out", dst]  # fmt: skip
    if tool == "info":
        return tool, ["info", draw(files)]
    return tool, ["convert", draw(files), "--to", "diffusers", "--out", dst]


def _tools(pool, figures, tmp_path, settings_) -> None:  # noqa: ANN001
    before = {k: Path(v).read_bytes() for k, v in pool.items() if Path(v).is_file()}

    @settings_
    @given(tool_argv(pool, tmp_path))
    def case(call: tuple[str, list[str]]) -> None:
        tool, argv = call
        fn = convert.main if tool == "convert" else lora.main
        _run(fn, argv, figures, "convert/lora")
        leftovers = [p.name for p in tmp_path.rglob("*") if PARTIAL_MARK in p.name]
        assert leftovers == [], leftovers

    case()
    after = {k: Path(v).read_bytes() for k, v in pool.items() if Path(v).is_file()}
    assert after == before  # the inputs were never written to


def test_conversion_and_lora_tools(pool, figures, tmp_path) -> None:
    _tools(pool, figures, tmp_path, settings(FAST, max_examples=30))


@pytest.mark.slow
def test_conversion_and_lora_tools_many(pool, figures, tmp_path) -> None:
    _tools(pool, figures, tmp_path, settings(FAST, max_examples=300, derandomize=False))
