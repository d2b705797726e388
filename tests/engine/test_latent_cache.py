"""cache_latents: the first stage encodes each training image once; the cache is keyed by file
content, transform and first-stage weights; the loss is the same with and without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.latent_cache import MOMENTS_KEY
from ldm.util import ConfigError, instantiate_from_config

ROOT = Path(__file__).parents[2]
SHAPES = [(32, 32), (24, 40), (40, 24)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for n in range(12):
        h, w = SHAPES[n % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{n}.png")
        (root / f"{n}.txt").write_text(f"a noise picture number {n}")
    return root


def _engine(cache_dir: Path | None, seed: int = 0):
    cfg = OmegaConf.load(ROOT / "configs" / "txt2img.yaml").model
    cfg.params.scale_by_std = False
    cfg.params.scale_factor = 0.5
    cfg.params.unet_config.params.model_channels = 32
    cfg.params.unet_config.params.num_head_channels = 16
    if cache_dir is not None:
        cfg.params.cache_latents = {"dir": str(cache_dir), "batch_size": 4}
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg)
    model.learning_rate = 1e-4
    return model


def _data(folder: Path, flip: bool = True) -> DataModuleFromConfig:
    params = {"root": str(folder), "size": 32, "flip": flip, "buckets": {"step": 8}}
    return DataModuleFromConfig(
        batch_size=4,
        num_workers=0,
        seed=0,
        train={"target": "ldm.data.folder.ImageFolderDataset", "params": params},
    )


class CountEncodes:
    def __init__(self, model):
        self.calls, self.images = 0, 0
        inner = model.first_stage_model.encode

        def counted(x):
            self.calls += 1
            self.images += len(x)
            return inner(x)

        model.first_stage_model.encode = counted


def _fit(model, data, epochs: int) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)


def test_second_epoch_and_second_run_do_not_encode_and_a_new_autoencoder_does(folder, tmp_path):
    model = _engine(tmp_path)
    counter = CountEncodes(model)
    data = _data(folder)
    _fit(model, data, epochs=2)
    # 12 images x (unflipped, flipped), encoded once, in batches of one bucket
    assert counter.images == 24
    assert counter.calls == 6  # 3 buckets x 8 entries / batch_size 4
    assert data.datasets["train"].latent_store is not None
    entries = list(tmp_path.rglob("*.safetensors"))
    assert len(entries) == 24

    again = _engine(tmp_path)
    counter = CountEncodes(again)
    _fit(again, _data(folder), epochs=1)
    assert counter.images == 0  # every entry found on disk

    changed = _engine(tmp_path)
    with torch.no_grad():
        changed.first_stage_model.encoder.conv_in.weight.mul_(1.01)
    counter = CountEncodes(changed)
    _fit(changed, _data(folder), epochs=1)
    assert counter.images == 24  # another fingerprint: nothing stale is read
    assert len({p.parent.parent for p in tmp_path.rglob("*.safetensors")}) == 2


def test_a_changed_file_gets_a_new_entry(folder, tmp_path):
    data = _data(folder, flip=False)
    data.setup("fit")
    ds = data.datasets["train"]
    before = ds.cache_variants(0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (32, 32), (9, 9, 9)).save(copy / "0.png")
    changed = _data(copy, flip=False)
    changed.setup("fit")
    assert changed.datasets["train"].cache_variants(0) != before
    assert changed.datasets["train"].cache_variants(1) == ds.cache_variants(1)


def test_loss_is_the_same_with_and_without_the_cache(folder, tmp_path):
    model = _engine(tmp_path)
    data = _data(folder, flip=False)
    data.setup("fit")
    ds = data.datasets["train"]
    batch = next(iter(data.train_dataloader()))
    from ldm.engine.latent_caching import fill_cache

    ds.use_latent_cache(fill_cache(model, ds, model.cache_latents))
    cached = next(iter(data.train_dataloader()))
    assert MOMENTS_KEY in cached and "image" not in cached
    assert cached["caption"] == batch["caption"]
    for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
        assert torch.equal(cached[key], batch[key])
    model.train()
    torch.manual_seed(5)
    loss_images, _ = model.shared_step(batch)
    torch.manual_seed(5)
    loss_cached, _ = model.shared_step(cached)
    torch.testing.assert_close(loss_cached, loss_images, rtol=1e-5, atol=1e-6)
    # the stored posterior is sampled at use time: another draw, another z
    z1 = model.prepare_batch(cached)[0]
    z2 = model.prepare_batch(cached)[0]
    assert not torch.equal(z1, z2)
    # image logs of a cached batch: the images decoded from the posterior means
    images = model.image_input(cached, "image")
    assert images.shape == (len(batch["image"]), 3, *batch["image"].shape[1:3])


def test_random_crop_and_bad_settings_are_refused(folder, tmp_path):
    data = DataModuleFromConfig(
        batch_size=4,
        num_workers=0,
        train={
            "target": "ldm.data.folder.ImageFolderDataset",
            "params": {"root": str(folder), "size": 32, "crop": "random"},
        },
    )
    data.setup("fit")
    with pytest.raises(ValueError, match="crop='random' would freeze one crop"):
        data.datasets["train"].cache_variants(0)
    from ldm.engine.latent_caching import cache_settings

    with pytest.raises(ConfigError, match="unknown keys"):
        cache_settings({"directory": "x"})
    with pytest.raises(ConfigError, match="batch_size"):
        cache_settings({"batch_size": 0})


def test_frozen_text_encoder_encodes_each_prompt_once():
    cfg = OmegaConf.load(ROOT / "configs" / "txt2img.yaml").model
    cfg.params.cond_stage_trainable = False
    cfg.params.scale_by_std = False
    cfg.params.unet_config.params.model_channels = 32
    cfg.params.unet_config.params.num_head_channels = 16
    torch.manual_seed(0)
    plain = instantiate_from_config(cfg)
    cfg.params.cache_text_embeddings = {"max_entries": 3}
    torch.manual_seed(0)
    cached = instantiate_from_config(cfg)
    (memo,) = cached.text_memos
    calls = []
    inner = memo.forward
    memo.forward = lambda texts: calls.append(list(texts)) or inner(texts)
    prompts = ["a red circle", "a blue square", "a red circle", ""]
    torch.testing.assert_close(
        cached.conditioner.encode_raw(prompts), plain.conditioner.encode_raw(prompts)
    )
    assert calls == [["a red circle", "a blue square", ""]]  # each distinct prompt once
    again = cached.conditioner.encode_raw(["", "a blue square"])
    torch.testing.assert_close(again, plain.conditioner.encode_raw(["", "a blue square"]))
    assert len(calls) == 1 and memo.hits == 3
    cached.conditioner.encode_raw(["a green star"])  # a 4th prompt: the least recent goes
    assert len(memo.table) == 3 and "a red circle" not in memo.table
    # a trainable text encoder is never memoised
    cfg.params.cond_stage_trainable = True
    assert instantiate_from_config(cfg).text_memos == []
