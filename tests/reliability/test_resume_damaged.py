"""Resuming a run whose last.ckpt is damaged or missing: the newest readable checkpoint is used
(and the final weights equal an uninterrupted run's); with none readable the run stops with the
list of what it tried."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import main as main_py
from ldm.launch import run
from ldm.launch_cli import parse_command
from ldm.resume_fallback import ResumeError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "configs" / "cli" / "toy.yaml")
# keep every checkpoint (steps 2, 4, 6) so that there is something to fall back to
COMMON = ["-t", "--no-test", "lightning.callbacks.image_logger=null",
          "lightning.modelcheckpoint.params.save_top_k=-1"]  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("resume")
    full = run(
        parse_command(["-b", TOY, *COMMON, "-l", str(d / "full"), "--trainer.max_steps", "8"]).spec
    )
    short = run(
        parse_command(["-b", TOY, *COMMON, "-l", str(d / "short"), "--trainer.max_steps", "6"]).spec
    )
    names = sorted(p.name for p in (short.run_dir / "checkpoints").glob("*.ckpt"))
    assert names == [
        "epoch=000000-step=000000002.ckpt",
        "epoch=000000-step=000000004.ckpt",
        "epoch=000000-step=000000006.ckpt",
        "last.ckpt",
    ]
    return {"full": full.last_ckpt, "short": short.run_dir}


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "logs" / run_dir.name
    shutil.copytree(run_dir, dst)
    return dst


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"epoch=000000-step={step:09d}.ckpt"


def _resume(run_dir: Path) -> object:
    return run(parse_command(["-r", str(run_dir), *COMMON, "--trainer.max_steps", "8"]).spec)


@pytest.mark.parametrize("damaged_steps", [(), (6,)], ids=["last", "last+step6"])
def test_damaged_last_ckpt_resumes_from_the_newest_readable(
    runs, damaged_steps, tmp_path, caplog, figures
) -> None:
    run_dir = _copy(runs["short"], tmp_path)
    _cut(run_dir / "checkpoints" / "last.ckpt")
    for step in damaged_steps:
        _cut(_ckpt(run_dir, step))
    with caplog.at_level(logging.WARNING, logger="ldm.main"):
        result = _resume(run_dir)
    used = 4 if damaged_steps else 6
    assert "last.ckpt: cannot resume from it: truncated" in caplog.text
    assert f"resuming from {_ckpt(run_dir, used)}" in caplog.text
    assert (run_dir / "checkpoints" / "last.ckpt.damaged").is_file()  # kept, out of the way
    assert result.global_step == 8
    a, b = _weights(runs["full"]), _weights(run_dir / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    figures["damaged last.ckpt: resumes from an older checkpoint, bit-equal"] += 1


def test_missing_last_ckpt_resumes_from_the_newest(runs, tmp_path, caplog) -> None:
    run_dir = _copy(runs["short"], tmp_path)
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    with caplog.at_level(logging.WARNING, logger="ldm.main"):
        assert _resume(run_dir).global_step == 8
    assert "last.ckpt: cannot resume from it: does not exist" in caplog.text


def test_nothing_readable_stops_with_the_list_tried(runs, tmp_path, caplog, figures) -> None:
    run_dir = _copy(runs["short"], tmp_path)
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        _cut(ckpt)
    with pytest.raises(ResumeError) as err:
        _resume(run_dir)
    message = str(err.value)
    assert "no readable checkpoint to resume from (tried 4" in message
    for step in (2, 4, 6):
        assert f"epoch=000000-step={step:09d}.ckpt: truncated" in message
    # from the command line: exit code 2 and the message, no traceback, nothing trained
    with caplog.at_level(logging.ERROR):
        assert main_py.main(["-r", str(run_dir), *COMMON]) == 2
    assert "no readable checkpoint" in caplog.text
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    figures["damaged run without a readable checkpoint: stops with the list, exit 2"] += 1


def test_a_damaged_checkpoint_named_explicitly_is_an_error(runs, tmp_path) -> None:
    run_dir = _copy(runs["short"], tmp_path)
    _cut(_ckpt(run_dir, 4))
    with pytest.raises(ResumeError, match=r"cannot resume from it: truncated.*Pass another"):
        run(parse_command(["-r", str(_ckpt(run_dir, 4)), *COMMON]).spec)


def test_a_flipped_byte_in_the_tensors_is_found_before_resuming(runs, tmp_path, caplog) -> None:
    """The CRC-32 of each record is checked before a resume (the data would train on otherwise)."""
    import struct
    import zipfile

    run_dir = _copy(runs["short"], tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    with zipfile.ZipFile(last) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 16)
    data = bytearray(last.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len + 8] ^= 0xFF  # inside the tensor bytes
    last.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ldm.main"):
        assert _resume(run_dir).global_step == 8
    assert "fails its CRC-32 checksum" in caplog.text


@pytest.mark.parametrize("model", ["toy_model.ToyModel", "noisy_validation.NoisyValidationToy"])
def test_resume_from_the_last_batch_of_an_epoch_is_bit_exact(model, tmp_path, figures) -> None:
    """A checkpoint saved after an epoch's last batch (step 8 of 8), before that epoch's
    validation: the resumed run goes on with the next epoch, whose data must not be skipped, and
    draws the same training noise although it does not repeat the validation."""
    argv = ["-b", TOY, *COMMON, f"model.target={model}"]
    full = run(
        parse_command([*argv, "-l", str(tmp_path / "full"), "--trainer.max_steps", "12"]).spec
    )
    short = run(
        parse_command([*argv, "-l", str(tmp_path / "short"), "--trainer.max_steps", "10"]).spec
    )
    step8 = _ckpt(short.run_dir, 8)
    # two hops: 8 -> 10, then 10 -> 12 (the second from a checkpoint the first resume wrote,
    # whose epoch counters Lightning leaves saying "finished": its data position must be used)
    first = run(parse_command(["-r", str(step8), *COMMON, "--trainer.max_steps", "10"]).spec)
    assert first.global_step == 10
    resumed = run(
        parse_command(["-r", str(short.run_dir), *COMMON, "--trainer.max_steps", "12"]).spec
    )
    assert resumed.global_step == 12
    names = sorted(p.name for p in (short.run_dir / "checkpoints").glob("epoch=*.ckpt"))
    assert "epoch=000001-step=000000012.ckpt" in names  # the epoch count did not jump
    a, b = _weights(full.last_ckpt), _weights(resumed.last_ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a)
    figures["resume from an epoch's last batch: bit-equal"] += 1
