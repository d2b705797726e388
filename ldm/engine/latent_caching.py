"""``cache_latents``: encode the training images once with the frozen first stage.

    cache_latents: true            # or {dir: PATH, batch_size: 16}
      # dir default: $LDM_CACHE_DIR/latents or ~/.cache/ldm/latents

At the start of fitting, every form of every training item (unflipped, and flipped when flips
are on) whose entry is not on disk yet is encoded, in batches of one bucket, with a progress bar;
ranks share the work and wait for each other. The data set then yields the stored encodings
instead of images, and the engine draws z from the stored posterior at every use (a KL first
stage; the same draw as without the cache for the same seed). The store's folder is named by a
fingerprint of the first stage's class and weights, so another autoencoder never reads stale
entries; entries are keyed by file content and transform (``ldm.data.latent_cache``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.data.image_io import BadImageError
from ldm.data.latent_cache import MOMENTS_KEY, LatentStore, default_cache_dir
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

CACHE_KEYS = ("dir", "batch_size")
__all__ = ["MOMENTS_KEY", "batch_size_of", "cache_settings", "latents_from_cache"]


def cache_settings(value: Any) -> dict[str, Any] | None:
    """The ``cache_latents`` config value as {dir, batch_size}, or None when off."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"cache_latents: expected true, false or a mapping with {list(CACHE_KEYS)}, "
            f"found {value!r}."
        )
    unknown = sorted(set(value) - set(CACHE_KEYS))
    if unknown:
        raise ConfigError(f"cache_latents: unknown keys {unknown}; known: {list(CACHE_KEYS)}.")
    batch_size = int(value.get("batch_size", 16))
    if batch_size < 1:
        raise ConfigError(f"cache_latents.batch_size: expected >= 1, found {batch_size}.")
    return {"dir": value.get("dir") or default_cache_dir(), "batch_size": batch_size}


def first_stage_fingerprint(engine: Any) -> str:
    """Hash of the first stage's class, precision switch and weights (names, shapes, bytes)."""
    fs = engine.first_stage_model
    h = hashlib.sha256(f"{type(fs).__module__}.{type(fs).__qualname__}".encode())
    h.update(str(bool(getattr(engine, "first_stage_fp32", False))).encode())
    for name, t in sorted(fs.state_dict().items()):
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def cacheable(dataset: Any) -> bool:
    """True when the data set supports cached encodings (``ImageFolderDataset``)."""
    return all(
        callable(getattr(dataset, name, None))
        for name in ("cache_variants", "cache_image", "use_latent_cache")
    )


def _encode(engine: Any, images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(engine.device)
    encoded = engine.encode_first_stage(x)
    if isinstance(encoded, DiagonalGaussianDistribution):
        return encoded.parameters.float()
    if isinstance(encoded, torch.Tensor):
        return encoded.float()
    raise ConfigError(
        f"cache_latents: the first stage's encode returned {type(encoded).__name__}; only a KL "
        "posterior (DiagonalGaussianDistribution) or a tensor can be cached."
    )


@torch.no_grad()
def fill_cache(
    engine: Any, dataset: Any, settings: Mapping[str, Any], rank: int = 0, world: int = 1
) -> LatentStore:
    """Encode this rank's share of the missing entries; returns the store (all ranks)."""
    store = LatentStore(settings["dir"], first_stage_fingerprint(engine))
    todo: dict[Any, list[tuple[int, bool, str]]] = {}
    total = 0
    buckets = getattr(dataset, "item_buckets", None)
    for i in tqdm(
        range(len(dataset)), desc="latent cache: hashing", disable=rank != 0, leave=False
    ):
        for key, flip in dataset.cache_variants(i):
            total += 1
            if key in store or (total - 1) % world != rank:
                continue
            group = buckets[i] if buckets is not None else None
            todo.setdefault(group, []).append((i, flip, key))
    missing = sum(len(v) for v in todo.values())
    logger.info(
        "latent cache %s: %d entries, %d to encode on this rank (%d processes)",
        store.dir,
        total,
        missing,
        world,
    )
    failed = 0
    bar = tqdm(total=missing, desc="latent cache: encoding", disable=rank != 0 or not missing)
    was_training = engine.training
    engine.eval()
    try:
        for group in sorted(todo, key=repr):
            entries = todo[group]
            for start in range(0, len(entries), int(settings["batch_size"])):
                chunk, images, micros = [], [], []
                for i, flip, key in entries[start : start + int(settings["batch_size"])]:
                    try:
                        image, micro = dataset.cache_image(i, flip)
                    except BadImageError:
                        failed += 1
                        continue
                    chunk.append(key)
                    images.append(image)
                    micros.append(micro)
                if chunk:
                    values = _encode(engine, images).cpu()
                    for key, value, micro in zip(chunk, values, micros):
                        store.put(key, {"value": value.clone(), **micro_tensors(micro)})
                bar.update(len(entries[start : start + int(settings["batch_size"])]))
    finally:
        bar.close()
        engine.train(was_training)
    if failed:
        logger.warning("latent cache: %d images failed to decode and are skipped", failed)
    return store


def micro_tensors(micro: Any) -> dict[str, torch.Tensor]:
    """A MicroConditioning as the tensors stored with an entry."""
    return {
        "original": torch.tensor(micro.original_size, dtype=torch.long),
        "crop": torch.tensor(micro.crop_coords_top_left, dtype=torch.long),
        "target": torch.tensor(micro.target_size, dtype=torch.long),
    }


def latents_from_cache(engine: Any, stored: torch.Tensor) -> torch.Tensor:
    """z = scale_factor * (a draw from the stored posterior | the stored latents)."""
    stored = stored.to(engine.device, torch.float32)
    fs = engine.first_stage_model
    moments = getattr(fs, "embed_dim", None)
    if moments is not None and stored.shape[1] == 2 * int(moments):
        z = DiagonalGaussianDistribution(stored).sample()
    else:
        z = stored
    return engine.scale_factor * z


def batch_size_of(batch: Mapping[str, Any], image_key: str) -> int:
    """Number of items in a batch, with images or cached encodings."""
    return len(
        batch[image_key] if image_key in batch or MOMENTS_KEY not in batch else batch[MOMENTS_KEY]
    )


def prepare_latent_cache(engine: Any, trainer: Any) -> None:
    """Fill the training data set's cache (ranks share the work) and switch it to cached items."""
    if engine.first_stage_model is None:
        raise ConfigError("cache_latents: this model has no first stage (pixel space) to cache.")
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "datasets", {}).get("train") if datamodule is not None else None
    if dataset is None or not cacheable(dataset):
        logger.warning(
            "cache_latents: the training data set (%s) cannot cache encodings (an image folder "
            "can); training encodes every batch.",
            type(dataset).__name__,
        )
        return
    store = fill_cache(
        engine, dataset, engine.cache_latents, trainer.global_rank, trainer.world_size
    )
    if trainer.world_size > 1:
        trainer.strategy.barrier("latent_cache")
    dataset.use_latent_cache(store)
