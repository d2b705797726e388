"""Weights-only loading: Lightning training checkpoints load; code-running pickles are refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint.safe_load import UnsafeCheckpointError, load_state_dict, read_checkpoint


class _PlantMarker:
    """Pickles to a call that creates a marker file: proof of code execution on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (Path.touch, (self.marker,))


def _lightning_like(tmp_path: Path) -> dict:
    cfg = OmegaConf.create(
        {
            "model": {
                "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                "params": {"timesteps": 10, "lst": [1, 2.5, "a"]},
            }
        }
    )
    return {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": {
            "model.diffusion_model.w": torch.randn(3, 2),
            "betas": torch.linspace(0, 1, 5, dtype=torch.float64),
        },
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/loss'}": {
                "best_model_score": torch.tensor(0.5),
                "best_model_path": str(tmp_path / "x.ckpt"),
            }
        },
        "optimizer_states": [
            {
                "state": {0: {"exp_avg": torch.zeros(3)}},
                "param_groups": [{"lr": 1e-4, "params": [0]}],
            }
        ],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 5, "_last_lr": [1e-4]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "config": cfg,
            "lst": OmegaConf.create([1, 2]),
            "np_f": np.float64(0.5),
            "np_i": np.int64(7),
            "arr": np.arange(3),
            "path": Path("/tmp/run"),
        },
    }


def test_lightning_checkpoint_with_extras_loads(tmp_path: Path) -> None:
    obj = _lightning_like(tmp_path)
    torch.save(obj, tmp_path / "last.ckpt")
    ck = read_checkpoint(tmp_path / "last.ckpt")
    assert set(ck.state_dict) == set(obj["state_dict"])
    assert torch.equal(
        ck.state_dict["model.diffusion_model.w"], obj["state_dict"]["model.diffusion_model.w"]
    )
    assert ck.state_dict["betas"].dtype == torch.float64
    assert ck.extras["global_step"] == 1234
    hp = ck.extras["hyper_parameters"]
    assert (
        hp["config"].model.params.lst == [1, 2.5, "a"]
        and hp["np_i"] == 7
        and hp["path"] == Path("/tmp/run")
    )


def test_lightning1_callback_class_keys_load_without_importing_lightning(tmp_path: Path) -> None:
    """PL 1.x keyed callback states by the callback class itself (SD v1 release files)."""
    import pytorch_lightning.callbacks.model_checkpoint as mc

    torch.save(
        {
            "state_dict": {"a": torch.ones(2)},
            "callbacks": {mc.ModelCheckpoint: {"best_model_score": None}},
        },
        tmp_path / "pl1.ckpt",
    )
    ck = read_checkpoint(tmp_path / "pl1.ckpt")
    (key,) = ck.extras["callbacks"]
    assert (
        key.__name__ == "ModelCheckpoint" and key is not mc.ModelCheckpoint
    )  # an inert placeholder


@pytest.mark.parametrize("legacy", [False, True])
def test_code_running_pickle_is_refused_and_code_does_not_run(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "payload": _PlantMarker(marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(
        UnsafeCheckpointError, match=r"Path\.touch|pathlib.*touch|global .*unsafe=True|unsafe=True"
    ) as err:
        load_state_dict(path)
    assert "unsafe=True" in str(err.value)
    assert not marker.exists()
    # the explicit override runs it (trusted files only)
    read_checkpoint(path, unsafe=True)
    assert marker.exists()


def test_refusal_names_the_global(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": 1, "x": os.getcwd}, f, protocol=2)  # names posix.getcwd
    with pytest.raises(UnsafeCheckpointError, match="getcwd"):
        read_checkpoint(path)
    with open(path, "wb") as f:
        pickle.dump({"w": 1}, f, protocol=4)  # opcodes torch's unpickler rejects
    with pytest.raises(UnsafeCheckpointError, match="Unsupported operand"):
        read_checkpoint(path)


def test_safetensors_bare_and_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"a.b": torch.randn(2, 3), "c": torch.arange(4)}
    save_file(
        sd, str(tmp_path / "m.safetensors"), metadata={"ldm_config": '{"model": {"target": "x"}}'}
    )
    ck = read_checkpoint(tmp_path / "m.safetensors")
    assert all(torch.equal(ck.state_dict[k], sd[k]) for k in sd)
    assert ck.embedded_config == {"model": {"target": "x"}}
    torch.save(sd, tmp_path / "bare.bin")
    assert set(load_state_dict(tmp_path / "bare.bin")) == set(sd)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="suffix"):
        read_checkpoint(tmp_path / "x.txt")
