"""DreamBoothClassImages in a real Lightning fit: the class images exist before the first batch is
drawn and the batches carry instance and class items (tiny engine, random weights, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from tiny_models import build_tiny, tiny_ldm_config
from torch.utils.data import ConcatDataset, Subset

from ldm.adapters.dreambooth import DreamBoothClassImages, find_dreambooth_datasets
from ldm.data.class_images import ClassImageMismatch
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset
from ldm.data.dreambooth import DreamBoothDataset

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASS = 6


def data_config(class_dir: Path) -> dict[str, Any]:
    """The data set of a shapes DreamBooth run: purple instances, training captions as classes."""
    return {
        "target": "ldm.data.dreambooth.DreamBoothDataset",
        "params": {
            "instance": {
                "target": "ldm.data.shapes.CaptionedShapes",
                "params": {"length": 4, "size": 16, "colours": ["purple"]},
            },
            "class_dir": str(class_dir),
            "num_class_images": N_CLASS,
            "class_prompts": {
                "target": "ldm.data.shapes.CaptionedShapes",
                "params": {"split": "train", "length": 100, "size": 16},
            },
        },
    }


class BatchRecorder(pl.Callback):
    """Records each training batch's prior flags and captions, and what was on disk then."""

    def __init__(self, class_dir: Path) -> None:
        self.class_dir = class_dir
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(
            {
                "prior": batch["prior"].tolist(),
                "caption": list(batch["caption"]),
                "files": len(list(self.class_dir.glob("*.png"))),
                "training": pl_module.training,
            }
        )


def fit(
    model: pl.LightningModule,
    class_dir: Path,
    callback: DreamBoothClassImages,
    max_steps: int = 2,
    ckpt_path: Path | None = None,
    num_workers: int = 0,
    **trainer_kwargs: Any,
) -> BatchRecorder:
    """A short fit on the DreamBooth data; checkpoints go next to the class folder."""
    recorder = BatchRecorder(class_dir)
    datamodule = DataModuleFromConfig(
        batch_size=8, num_workers=num_workers, seed=0, train=data_config(class_dir)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        default_root_dir=class_dir.parent,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[callback, recorder, ModelCheckpoint(class_dir.parent / "ckpt", save_last=True)],
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return recorder


def tiny_model() -> pl.LightningModule:
    """The tiny engine as its config builds it (same weights every time), in training mode."""
    cfg = tiny_ldm_config()
    cfg["model"]["params"].update(first_stage_key="image", cond_stage_key="caption")
    return build_tiny(cfg).train()


def test_class_images_are_made_before_the_first_batch_and_batches_hold_both_kinds(
    tmp_path: Path,
) -> None:
    model = tiny_model()
    class_dir = tmp_path / "class"
    callback = DreamBoothClassImages(batch_size=4, steps=2)
    recorder = fit(model, class_dir, callback)
    assert callback.made == N_CLASS
    assert len(recorder.batches) == 2
    for batch in recorder.batches:
        assert batch["files"] == N_CLASS  # every class image was there at the first batch
        assert batch["training"]  # generation (in eval mode) gave the model back as it was
        assert True in batch["prior"] and False in batch["prior"]
        for prior, caption in zip(batch["prior"], batch["caption"]):
            assert ("purple" in caption) != prior  # instances are purple, class prompts never
    # resuming (a new process: the model built from its config, then the checkpoint restored
    # after the callback's setup) finds the folder complete, made by this model: nothing made
    again = DreamBoothClassImages(batch_size=4, steps=2)
    resumed = fit(
        tiny_model(), class_dir, again, max_steps=3, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert again.made == 0 and len(resumed.batches) == 1
    # the fine-tuned weights are another model: a cache is not silently reused for them
    with pytest.raises(ClassImageMismatch, match="another model"):
        fit(model, class_dir, DreamBoothClassImages(batch_size=4, steps=2))


def test_finds_dreambooth_data_sets_inside_wrappers(tmp_path: Path) -> None:
    ds = DreamBoothDataset(
        instance={"target": "ldm.data.shapes.CaptionedShapes", "params": {"length": 2, "size": 16}}
    )

    class DataModule:
        datasets = {"train": WrappedDataset(ConcatDataset([Subset(ds, [0])]))}

    class Trainer:  # only what find_dreambooth_datasets reads
        datamodule = DataModule()
        fit_loop = None

    assert find_dreambooth_datasets(Trainer()) == [ds]


def test_images_are_there_when_configure_optimizers_builds_the_train_loader(
    tmp_path: Path,
) -> None:
    """``trainer.estimated_stepping_batches`` in configure_optimizers builds the train loader and
    its iterator (worker processes start fetching) before ``on_fit_start``; the callback's
    ``setup`` runs before it."""
    model = tiny_model()
    default = model.configure_optimizers

    def configure_optimizers():
        assert model.trainer.estimated_stepping_batches == 2  # builds the loader, workers fetch
        return default()

    model.configure_optimizers = configure_optimizers
    callback = DreamBoothClassImages(batch_size=6, steps=1)
    # with max_steps alone the estimate needs no loader: one epoch of 2 batches does
    recorder = fit(
        model, tmp_path / "class", callback, num_workers=2, max_epochs=1, limit_train_batches=2
    )
    assert callback.made == N_CLASS and len(recorder.batches) == 2
