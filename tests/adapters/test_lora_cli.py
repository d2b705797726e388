"""`ldm-lora` round trips on tiny files: extract -> merge gives the tuned model, unmerge gives the
base back, convert kohya <-> diffusers (against a model or by the file's own names), info."""

from __future__ import annotations

import argparse

import pytest
import torch
from lora_files import SDXL_TEXT_KEYS, SDXL_UNET_KEYS, low_rank, tsv_shapes
from safetensors.torch import save_file

from ldm.adapters.lora_io import load_lora, read_named, save_lora
from ldm.adapters.lora_layout import layout_of
from ldm.adapters.lora_names import target_names
from ldm.adapters.lora_rows import combine_rows
from ldm.adapters.lora_weights import LoraModule
from ldm.checkpoint.safe_load import load_state_dict
from ldm.commands.lora import main, parse_lora_arg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tiny_sdxl import build_tiny_sdxl

    root = tmp_path_factory.mktemp("cli")
    base = {k: v.clone().contiguous() for k, v in build_tiny_sdxl().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tuned = dict(base)
    for k in SDXL_UNET_KEYS + SDXL_TEXT_KEYS:
        tuned[k] = base[k] + low_rank(base[k].shape, 2, g)
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return root, base, tuned


def _close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_extract_merge_unmerge_round_trip(files, capsys):
    root, base, tuned = files
    lora, merged, back = (
        root / "x.safetensors",
        root / "merged.safetensors",
        root / "back.safetensors",
    )
    args = ["--base", str(root / "base.safetensors"), "--tuned", str(root / "tuned.safetensors")]
    assert main(["extract", *args, "--rank", "4", "--conv-rank", "4", "--clamp-quantile", "1",
                 "--out", str(lora)]) == 0  # fmt: skip
    assert main(["merge", str(root / "base.safetensors"), "--lora", f"{lora}:1.0",
                 "--out", str(merged)]) == 0  # fmt: skip
    _close(load_state_dict(merged), tuned, atol=2e-6)
    assert main(["unmerge", str(merged), "--lora", str(lora), "--out", str(back)]) == 0
    _close(load_state_dict(back), base, atol=2e-6)
    assert main(["info", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "format:     kohya" in out
    assert "lora_te1: 1, lora_te2: 4, lora_unet: 5" in out  # te2: q, k, v thirds and fc1
    assert "ss_network_dim: 4" in out


def test_convert_with_and_without_the_model(files, capsys):
    root, base, tuned = files
    kohya, diff, again = (root / f"{n}.safetensors" for n in ("k", "d", "k2"))
    assert main(["extract", "--base", str(root / "base.safetensors"), "--tuned",
                 str(root / "tuned.safetensors"), "--rank", "2", "--conv-rank", "2",
                 "--out", str(kohya)]) == 0  # fmt: skip
    like = ["--like", str(root / "base.safetensors")]
    assert main(["convert", str(kohya), "--to", "diffusers", "--out", str(diff), *like]) == 0
    assert main(["convert", str(diff), "--to", "kohya", "--out", str(again)]) == 0  # own names
    first, last = read_named(kohya)[0], read_named(again)[0]
    assert set(first) == set(last)
    for name, m in first.items():
        assert torch.equal(m.down, last[name].down) and torch.equal(m.up, last[name].up)
        assert m.alpha == last[name].alpha
    shapes = {k: v.shape for k, v in base.items()}
    a, b = load_lora(kohya, shapes), load_lora(diff, shapes)
    assert all(torch.equal(a.modules[k].delta(), b.modules[k].delta()) for k in a.modules)
    # original (sgm) U-Net names of a non-SDXL-width file: the block counts need the model
    assert (
        main(["convert", str(kohya), "--to", "diffusers", "--out", str(root / "z.safetensors")])
        == 2
    )
    assert "--like" in capsys.readouterr().err


@pytest.mark.parametrize(
    "tsv, fmt", [(("sd-v1-unet-vae.tsv", "sd-v1-text-encoder.tsv"), "kohya"),
                 (("sd-v2-unet-vae.tsv", "sd-v2-text-encoder.tsv"), "diffusers"),
                 (("sdxl-base.tsv",), "kohya")],
    ids=["sd-v1", "sd-v2", "sdxl"],
)  # fmt: skip
def test_convert_by_names_renames_every_target_of_the_real_families(tmp_path, tsv, fmt):
    """Every LoRA target of SD v1 / v2 / SDXL: convert without --like gives the names that
    save_lora gives from the model's keys."""
    shapes = tsv_shapes(*tsv)
    g = torch.Generator().manual_seed(0)
    parts: dict[str, list[LoraModule]] = {}  # packed q | k | v: one module per third, as files hold
    for t in target_names(layout_of(shapes), shapes):
        s = shapes[t.key]
        out = s[0] if t.rows is None else t.rows[1] - t.rows[0]
        up = torch.randn(out, 1, *((1, 1) if len(s) == 4 else ()), generator=g)
        parts.setdefault(t.key, []).append(
            LoraModule(torch.randn(1, *s[1:], generator=g), up, 1.0, t.rows)
        )
    modules = {k: combine_rows(ms, shapes[k][0]) for k, ms in parts.items()}
    src = tmp_path / "src.safetensors"
    other = "diffusers" if fmt == "kohya" else "kohya"
    save_lora(src, modules, shapes, format=fmt)
    assert main(["convert", str(src), "--to", other, "--out", str(tmp_path / "o.safetensors")]) == 0
    save_lora(tmp_path / "ref.safetensors", modules, shapes, format=other)
    got, want = (
        read_named(tmp_path / "o.safetensors")[0],
        read_named(tmp_path / "ref.safetensors")[0],
    )
    assert sorted(got) == sorted(want)


@pytest.mark.parametrize(
    "text, want",
    [
        ("a.safetensors", ("a.safetensors", 1.0)),
        ("a.safetensors:0.5", ("a.safetensors", 0.5)),
        ("dir/a.safetensors:-1e-1", ("dir/a.safetensors", -0.1)),
        ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)),
        ("C:\\loras\\a.safetensors:0.8", ("C:\\loras\\a.safetensors", 0.8)),
        ("odd:name/a.safetensors", ("odd:name/a.safetensors", 1.0)),
    ],
)
def test_lora_argument_parsing(text, want):
    assert parse_lora_arg(text) == want


def test_a_scale_that_is_not_a_number_after_a_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(argparse.ArgumentTypeError, match="scale 'abc' after a.safetensors is not"):
        parse_lora_arg("a.safetensors:abc")
    # no file before the colon, or a file whose name holds the colon: the whole text is the path
    assert parse_lora_arg("b.safetensors:abc") == ("b.safetensors:abc", 1.0)
    (tmp_path / "c.safetensors:abc").write_bytes(b"")
    assert parse_lora_arg("c.safetensors:abc") == ("c.safetensors:abc", 1.0)


def test_extract_from_two_different_models_is_refused(files, tmp_path, capsys):
    from tiny_models import build_tiny, tiny_ldm_config

    root = files[0]
    v1 = tmp_path / "v1.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny(tiny_ldm_config()).state_dict().items()},
              str(v1))  # fmt: skip
    out = tmp_path / "e.safetensors"
    argv = ["extract", "--base", str(v1), "--tuned", str(root / "tuned.safetensors"),
            "--rank", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different models" in err and "SDXL layout" in err
    assert not out.exists()


def test_out_that_replaces_an_input_or_cannot_be_read_back_is_refused(files, tmp_path, capsys):
    root, _, _ = files
    base, tuned = root / "base.safetensors", root / "tuned.safetensors"
    lora = tmp_path / "l.safetensors"
    assert main(["extract", "--base", str(base), "--tuned", str(tuned), "--rank", "2",
                 "--out", str(lora)]) == 0  # fmt: skip
    capsys.readouterr()
    before = base.read_bytes()
    same = root / "sub" / ".." / "base.safetensors"  # another spelling of the input
    runs = {
        "merge": ["merge", str(base), "--lora", str(lora), "--out", str(same)],
        "merge-lora": ["merge", str(base), "--lora", f"{lora}:0.5", "--out", str(lora)],
        "extract": ["extract", "--base", str(base), "--tuned", str(tuned), "--rank", "2",
                    "--out", str(tuned)],
        "convert": ["convert", str(lora), "--to", "diffusers", "--out", str(lora)],
    }  # fmt: skip
    for name, argv in runs.items():
        assert main(argv) == 2, name
        assert "replace an input" in capsys.readouterr().err, name
    assert base.read_bytes() == before
    txt = tmp_path / "m2.txt"
    assert main(["merge", str(base), "--lora", str(lora), "--out", str(txt)]) == 2
    assert "name the output with one of them" in capsys.readouterr().err
    assert not txt.exists()
    assert main(["convert", str(lora), "--to", "kohya", "--out", str(tmp_path / "c.json")]) == 2
