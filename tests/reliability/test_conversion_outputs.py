"""``ldm-convert`` / ``ldm-lora`` outputs appear whole or not at all: a damaged input, a full disk
or an error midway leaves no partial output file and keeps an existing output unchanged."""

from __future__ import annotations

import errno
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldm.atomic_output import PARTIAL_MARK
from ldm.checkpoint.safe_load import read_checkpoint
from ldm.commands import convert

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
FAST = settings(
    max_examples=25,
    deadline=10000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
SLOW = settings(FAST, max_examples=400, derandomize=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    g = torch.Generator().manual_seed(1)
    sd = {"model.w": torch.randn(32, 16, generator=g), "model.b": torch.randn(32, generator=g)}
    path = tmp_path_factory.mktemp("src") / "run.ckpt"
    torch.save({"state_dict": sd, "global_step": 3, "optimizer_states": []}, path)
    return path, path.read_bytes()


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if PARTIAL_MARK in p.name or p.name.endswith(".tmp")]


def _convert_damaged(source, tmp_path: Path, figures: Counter, settings_) -> None:  # noqa: ANN001
    src_path, data = source
    original = torch.load(src_path, weights_only=True)["state_dict"]

    @settings_
    @given(
        cut=st.one_of(st.just(len(data)), st.integers(0, len(data))),
        flips=st.lists(st.integers(0, len(data) - 1), max_size=3),
    )
    def case(cut: int, flips: list[int]) -> None:
        damaged = bytearray(data[:cut])
        for i in flips:
            if i < len(damaged):
                damaged[i] ^= 0x5A
        src = tmp_path / "in.ckpt"
        src.write_bytes(bytes(damaged))
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        dst = out / "pruned.safetensors"
        dst.unlink(missing_ok=True)
        figures["conversion fuzz: cases"] += 1
        rc = convert.main([str(src), str(dst), "--ema", "drop"])
        assert rc in (0, 2)
        assert _leftovers(out) == []
        if rc == 0:  # the source's CRC-32 checksums are verified: converted means unchanged
            out_sd = read_checkpoint(dst).state_dict
            assert out_sd.keys() == original.keys()
            assert all(torch.equal(out_sd[k], original[k]) for k in original)
            figures["conversion fuzz: converted"] += 1
        else:
            assert not dst.exists()
            figures["conversion fuzz: clean errors, no output"] += 1

    case()


def test_damaged_source_leaves_no_output(source, tmp_path, figures) -> None:
    _convert_damaged(source, tmp_path, figures, FAST)


@pytest.mark.slow
def test_damaged_source_leaves_no_output_many(source, tmp_path, figures) -> None:
    _convert_damaged(source, tmp_path, figures, SLOW)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_disk_full_midway_keeps_the_previous_output(
    source, suffix, tmp_path, monkeypatch, capsys, figures
) -> None:
    """ENOSPC after half of the output: exit 1, a message with the folder and the space needed,
    the earlier output unchanged, no partial file."""
    src, _ = source
    dst = tmp_path / f"pruned{suffix}"
    assert convert.main([str(src), str(dst)]) == 0
    before = dst.read_bytes()
    real_open = open

    class FullDisk:
        """A file whose writes fail with ENOSPC once 100 bytes are written."""

        def __init__(self, f) -> None:  # noqa: ANN001
            self.f, self.n = f, 0

        def write(self, b) -> int:  # noqa: ANN001
            self.n += len(b)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return self.f.write(b)

        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(self.f, name)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            self.f.close()

    def full_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and PARTIAL_MARK in str(file):
            return FullDisk(f)
        return f

    import safetensors.torch

    def save_file(tensors, filename, metadata=None) -> None:  # noqa: ANN001
        with full_open(filename, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata=metadata))

    monkeypatch.setattr("builtins.open", full_open)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    rc = convert.main([str(src), str(dst)])
    err = capsys.readouterr().err
    figures["disk full: conversion cases"] += 1
    assert rc == 1, err
    assert "disk full" in err and str(tmp_path) in err and "free" in err, err
    assert dst.read_bytes() == before and _leftovers(tmp_path) == []
