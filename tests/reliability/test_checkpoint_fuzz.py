"""Damaged checkpoint files -> the loaders: a clean error or a correct state dict, never a traceback,
a hang or a partial output file.

Random truncations, byte flips and header edits of small `.ckpt` (torch zip and legacy pickle) and
`.safetensors` files go to ``read_checkpoint`` (as the sampling and conversion commands load
them), and to ``ldm-convert``, whose output must then be absent with no temporary file left.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ldm.checkpoint.integrity import CorruptCheckpointError, check_checkpoint_file
from ldm.checkpoint.safe_load import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_checkpoint,
)

# damaged pickles make torch warn about the protocol number they appear to have
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

#: what a loader may raise for a damaged file: everything else is a traceback for the user
CLEAN = (CheckpointFormatError, UnsafeCheckpointError)
FAST = settings(
    max_examples=60,
    deadline=5000,  # a hang fails the example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
SLOW = settings(FAST, max_examples=1500, derandomize=False)
KINDS = ("zip", "legacy", "safetensors")


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.in.weight": torch.randn(16, 8, generator=g),
        "model.diffusion_model.in.bias": torch.randn(16, generator=g).half(),
        "first_stage_model.scale": torch.tensor(0.18215),
        "cond_stage_model.ids": torch.arange(24).view(2, 12),
        "mask": torch.rand(5, 5, generator=g) > 0.5,
    }


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    d = tmp_path_factory.mktemp("originals")
    sd = _state()
    lightning = {"state_dict": sd, "global_step": 7, "epoch": 0, "hyper_parameters": {"lr": 1e-4}}
    torch.save(lightning, d / "zip.ckpt")
    torch.save(lightning, d / "legacy.ckpt", _use_new_zipfile_serialization=False)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    files = {
        "zip": d / "zip.ckpt",
        "legacy": d / "legacy.ckpt",
        "safetensors": d / "model.safetensors",
    }
    return {k: (p, p.read_bytes()) for k, p in files.items()}


def _header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@st.composite
def mutations(draw: st.DrawFn, data: bytes, kind: str) -> tuple[str, bytes]:
    """(what was done, damaged bytes)."""
    size = len(data)
    how = draw(st.sampled_from(["truncate", "flip", "header", "junk"]))
    if how == "truncate":
        n = draw(st.integers(0, size - 1))
        return f"truncate to {n}", data[:n]
    if how == "flip":
        out = bytearray(data)
        spots = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=4))
        for i in spots:
            out[i] ^= draw(st.integers(1, 255))
        return f"flip {spots}", bytes(out)
    if how == "junk":
        junk = draw(st.binary(min_size=1, max_size=64))
        where = draw(st.sampled_from(["append", "prepend", "replace-start"]))
        if where == "append":
            return "append junk", data + junk
        if where == "prepend":
            return "prepend junk", junk + data
        return "replace start", junk + data[len(junk) :]
    # header edits: the parts that say how much data follows
    if kind == "safetensors":
        end = _header_end(data)
        choice = draw(st.sampled_from(["length", "digit"]))
        if choice == "length":
            n = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(end - 8 - 64, end - 8 + 64)))
            return f"header length {n}", struct.pack("<Q", max(0, n)) + data[8:]
        header = bytearray(data[8:end])
        digits = [i for i, b in enumerate(header) if 48 <= b <= 57]
        i = draw(st.sampled_from(digits))
        header[i] = 48 + (header[i] - 48 + draw(st.integers(1, 9))) % 10
        return f"header digit {i}", data[:8] + bytes(header) + data[end:]
    # zip: end-of-central-directory and local-header size fields
    i = draw(st.integers(max(0, size - 22), size - 1))
    out = bytearray(data)
    out[i] ^= draw(st.integers(1, 255))
    return f"zip directory byte {i}", bytes(out)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def _try_load(path: Path, original: dict[str, torch.Tensor], figures: Counter, tag: str) -> str:
    """Load a damaged file; 'error' / 'intact' / 'changed'. Any other exception fails the test."""
    figures[f"checkpoint fuzz ({tag}): cases"] += 1
    try:
        loaded = read_checkpoint(path, verify=path.suffix == ".ckpt")
    except CLEAN as err:
        assert str(err).strip(), "an error without a message"
        assert str(path) in str(err) or path.name in str(err), f"the file is not named: {err}"
        figures[f"checkpoint fuzz ({tag}): clean errors"] += 1
        return "error"
    if _same(loaded.state_dict, original):
        figures[f"checkpoint fuzz ({tag}): loaded intact"] += 1
        return "intact"
    figures[f"checkpoint fuzz ({tag}): loaded with changed bytes (no checksum)"] += 1
    return "changed"


def _check(kind: str, what: str, outcome: str) -> None:
    """Truncations are always found; only formats without checksums over the changed bytes
    (safetensors, legacy pickles) may load changed values."""
    if what.startswith("truncate"):
        assert outcome == "error", f"{kind}: {what} was not detected"
    if kind == "zip":
        assert outcome != "changed", f"zip: {what} loaded changed data despite the CRC-32 check"


def _fuzz(kind: str, originals, figures, tmp_path: Path, settings_) -> None:  # noqa: ANN001
    path, data = originals[kind]
    original = _state()

    @settings_
    @given(mutations(data, kind))
    def case(mutation: tuple[str, bytes]) -> None:
        what, damaged = mutation
        target = tmp_path / path.name
        target.write_bytes(damaged)
        outcome = _try_load(target, original, figures, kind)
        _check(kind, what, outcome)

    case()


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoints_load_or_fail_cleanly(kind, originals, figures, tmp_path) -> None:
    _fuzz(kind, originals, figures, tmp_path, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoints_load_or_fail_cleanly_many(kind, originals, figures, tmp_path) -> None:
    _fuzz(kind, originals, figures, tmp_path, SLOW)


def test_every_truncation_point_of_small_files_is_found(originals, figures, tmp_path) -> None:
    """Not sampled: every cut of each file, in steps (all bytes for the safetensors header)."""
    for kind in KINDS:
        path, data = originals[kind]
        step = 1 if kind == "safetensors" else 7
        for n in range(0, len(data), step):
            target = tmp_path / path.name
            target.write_bytes(data[:n])
            figures["checkpoint truncations: cases"] += 1
            with pytest.raises(CLEAN):
                read_checkpoint(target)
            figures["checkpoint truncations: clean errors"] += 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty (0 bytes)"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "looks like a PNG image"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 64, "looks like a JPEG image"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 3\n", "git-lfs pointer"),
        (b"PK\x05\x06" + b"\0" * 18, "zip archive without a torch data.pkl"),
        (b"model:\n  target: x\n", "a text file"),
    ],
)
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_not_a_checkpoint_says_what_the_file_is(content, expected, suffix, tmp_path) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    if expected.startswith("zip") and suffix == ".safetensors":
        expected = "not a .safetensors file"
    assert str(path) in message and expected in message, message


def test_truncation_message_gives_both_sizes(originals, tmp_path) -> None:
    for kind in ("zip", "safetensors"):
        path, data = originals[kind]
        cut = tmp_path / path.name
        cut.write_bytes(data[: len(data) // 3])
        with pytest.raises(CorruptCheckpointError, match=r"truncated: .* of an expected .*"):
            check_checkpoint_file(cut)


def test_lying_safetensors_header(originals, tmp_path) -> None:
    """A header that promises more bytes than the file has (every byte of the file present)."""
    _, data = originals["safetensors"]
    end = _header_end(data)
    header = data[8:end].decode()
    bigger = header.replace('"shape":[16,8]', '"shape":[160,8]', 1)
    assert bigger != header
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(bigger)) + bigger.encode() + data[end:])
    with pytest.raises(CorruptCheckpointError, match="spans|of an expected"):
        read_checkpoint(lying)
