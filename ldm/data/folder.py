"""Image folder with captions: metadata.jsonl/.csv (Hugging Face imagefolder), sidecar .txt, or none.

Items are CompVis data items: `{image_key: H x W x 3 float32 in [-1, 1], caption_key: str}`,
plus the SDXL micro-conditioning of the transform (`ldm.data.micro_conditioning`: original
size, crop offsets, target size; LongTensors of shape [2]).
Bad files are found cheaply at construction (PIL verify) and again on decode in `__getitem__`,
where a failing index is replaced deterministically by the next good one; both are counted
(`dataset.skipped`) and reported once.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.buckets import BucketSpec, Size, describe_buckets
from ldm.data.captions import caption_processor_from_config, item_rng
from ldm.data.folder_params import (
    check_background,
    check_bool,
    check_extensions,
    check_flip,
    check_optional_int,
    check_size,
)
from ldm.data.folder_splits import split_roots
from ldm.data.image_io import (
    IMAGE_EXTENSIONS,
    BadImageError,
    SkipLog,
    displayed_size,
    load_rgb,
    verify_image,
)
from ldm.data.latent_cache import MOMENTS_KEY, LatentStore, entry_key, file_digest
from ldm.data.metadata_file import read_caption_file, read_metadata
from ldm.data.micro_conditioning import MicroConditioning
from ldm.data.transforms import ImageTransform
from ldm.util import ConfigError, MissingPathError

__all__ = [
    "ImageFolderDataset",
    "find_images",
    "images_and_captions",
    "read_caption_file",
    "read_metadata",
]

logger = logging.getLogger(__name__)

CAPTION_SOURCES = ("auto", "metadata", "txt", "none")
VALIDATE_MODES = ("verify", "full", "none")
MAX_SUBSTITUTES = 64


def find_images(root: Path, extensions: tuple[str, ...], recursive: bool = True) -> list[Path]:
    """All files under `root` with an image extension (case-insensitive), sorted."""
    exts = {e.lower() for e in extensions}
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in exts and p.is_file())


def images_and_captions(
    roots: list[Path],
    extensions: tuple[str, ...],
    recursive: bool = True,
    caption_column: str | None = None,
    metadata: bool = True,
) -> tuple[list[Path], dict[Path, str]]:
    """(image paths, metadata captions by resolved path) of the folders ``roots`` (a root, or
    its split folders); ``metadata`` False: no metadata file is read."""
    paths = [p for r in roots for p in find_images(r, extensions, recursive)]
    captions: dict[Path, str] = {}
    for r in roots if metadata else ():
        captions.update(read_metadata(r, recursive, caption_column))
    return paths, captions


class ImageFolderDataset(Dataset):
    """Images under `root` (recursive) with captions from metadata, sidecar .txt, or none."""

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | None = 256,
        caption_source: str = "auto",
        image_key: str = "image",
        caption_key: str = "caption",
        crop: str = "center",
        flip: bool | float = False,
        interpolation: str = "bicubic",
        recursive: bool = True,
        extensions: tuple[str, ...] | list[str] = IMAGE_EXTENSIONS,
        caption_column: str | None = None,
        default_caption: str = "",
        validate: str = "verify",
        background: tuple[int, int, int] | list[int] = (255, 255, 255),
        return_path: bool = False,
        max_items: int | None = None,
        buckets: Any = "auto",
        captions: Any = None,
        seed: int | None = None,
        split: str | None = None,
    ):
        """`split`: with split folders under `root` (train/, test/, validation/, ... as Hugging
        Face's imagefolder names them) the one split to read, default 'train'; None without."""
        if caption_source not in CAPTION_SOURCES:
            raise ValueError(
                f"caption_source must be one of {CAPTION_SOURCES}, got {caption_source!r}"
            )
        if validate not in VALIDATE_MODES:
            raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise MissingPathError(
                f"image folder {str(self.root)!r} does not exist or is not a directory; "
                "set data.params.<split>.params.root to a folder of images"
            )
        size = check_size(size)
        extensions = check_extensions(extensions)
        recursive = check_bool("recursive", recursive)
        max_items = check_optional_int("max_items", max_items)
        self.image_key, self.caption_key = image_key, caption_key
        self.transform = ImageTransform(
            size, crop=crop, flip=check_flip(flip), interpolation=interpolation
        )
        self.background = check_background(background)
        self.return_path = return_path
        self.default_caption = default_caption
        self.skipped = SkipLog(f"image folder {self.root}")
        roots, self.split = split_roots(self.root, split)

        paths, metadata = images_and_captions(  # 'txt' / 'none' never read the metadata
            roots, extensions, recursive, caption_column, caption_source in ("auto", "metadata")
        )
        if caption_source == "auto":
            if metadata:
                caption_source = "metadata"
            elif any(p.with_suffix(".txt").is_file() for p in paths):
                caption_source = "txt"
            else:
                caption_source = "none"
        self.caption_source = caption_source
        self._no_sidecar: set[Path] = set()
        self.paths, self.captions = self._pair_captions(paths, metadata, caption_source)
        if validate != "none":
            self._prevalidate(full=validate == "full")
        self.skipped.report()  # one warning: count and first names (missing or unreadable files)
        self._report_missing_sidecars()
        if max_items is not None:
            self.paths, self.captions = self.paths[:max_items], self.captions[:max_items]
        if not self.paths:
            looked = f"files ending in {', '.join(extensions)}"
            if caption_source == "metadata":
                looked += " listed in metadata.jsonl/metadata.csv"
            why = f" ({self.skipped.count} bad files skipped)" if self.skipped.count else ""
            raise ValueError(
                f"image folder {str(self.root)!r} has no usable images{why}: looked "
                f"{'recursively ' if recursive else ''}for {looked}"
            )
        self._bad: set[int] = set()
        self.caption_processor = caption_processor_from_config(captions)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # seen by workers
        self.bucket_spec = self._bucket_spec(buckets, size)
        self.item_buckets: list[Size] | None = None
        self._members: dict[Size, list[int]] | None = None  # bucket -> its items, sorted
        self._digests: dict[int, str] | None = None  # item -> SHA-256 of its file (latent cache)
        self.latent_store: LatentStore | None = None
        if self.bucket_spec is not None:
            self.item_buckets = self.bucket_spec.assign(self._sizes())
            logger.info("image folder %s: %s", self.root, describe_buckets(self.item_buckets))
        logger.info(
            "image folder %s: %d images, captions from %s",
            self.root,
            len(self.paths),
            caption_source,
        )

    def _pair_captions(
        self, paths: list[Path], metadata: dict[Path, str], source: str
    ) -> tuple[list[Path], list[str | None]]:
        if source == "none":
            return paths, [None] * len(paths)
        if source == "txt":
            captions = []
            for p in paths:
                txt = p.with_suffix(".txt")
                if txt.is_file():
                    captions.append(read_caption_file(txt))
                else:
                    self._no_sidecar.add(p)
                    captions.append(self.default_caption)
            return paths, captions
        if not metadata:
            raise ValueError(
                f"caption_source='metadata' but no metadata.jsonl or metadata.csv under {self.root}"
            )
        on_disk = {p.resolve() for p in paths}
        kept = [(p, c) for p, c in sorted(metadata.items()) if p in on_disk]
        for p in sorted(set(metadata) - on_disk):
            self.skipped.add(str(p), "listed in metadata but not found")
        unlisted = len(on_disk) - len(kept)
        if unlisted:
            logger.warning(
                "image folder %s: %d images are not listed in the metadata file(s) and are ignored",
                self.root,
                unlisted,
            )
        return [p for p, _ in kept], [c for _, c in kept]

    def _report_missing_sidecars(self) -> None:
        """One warning: how many of the readable images have no sidecar .txt caption."""
        missing = sum(p in self._no_sidecar for p in self.paths)
        if missing:
            logger.warning(
                "image folder %s: %d of %d images have no sidecar .txt caption; using %r",
                self.root,
                missing,
                len(self.paths),
                self.default_caption,
            )

    @staticmethod
    def _bucket_spec(buckets: Any, size: int | None) -> BucketSpec | None:
        """'auto' (default): buckets of area size**2 in steps of 64 px (size >= 256) or size / 4
        (sizes 32..255, at least 8; below 32 none); false: square crops of `size`; true / a mapping: BucketSpec."""
        if size is None or buckets is None or buckets is False:
            return None
        if buckets == "auto":
            if size < 32:
                return None  # too small to have more than one shape
            return BucketSpec(resolution=int(size), step=64 if size >= 256 else max(8, size // 4))
        if buckets is True:
            return BucketSpec(resolution=int(size))
        try:
            cfg = dict(buckets)
        except (TypeError, ValueError):
            raise ValueError(
                f"buckets: expected 'auto', true, false or a mapping (resolution, step, min_side, "
                f"max_side, upscale), found {buckets!r}"
            ) from None
        cfg.setdefault("resolution", int(size))
        return BucketSpec.from_config(cfg)

    def _sizes(self) -> list[Size]:
        """(h, w) of every image from its header (EXIF rotation applied); unreadable: (size, size)."""
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(self._size_of, self.paths, chunksize=64))

    def _size_of(self, path: Path) -> Size:
        try:
            return displayed_size(path)
        except BadImageError:  # found again (and skipped) when decoded
            side = self.bucket_spec.resolution if self.bucket_spec else 256
            return (side, side)

    def _check(self, path: Path, full: bool) -> str | None:
        if not full:
            return verify_image(path)
        try:
            load_rgb(path, self.background)
        except BadImageError as exc:
            return str(exc)
        return None

    def _prevalidate(self, full: bool) -> None:
        """Drop files that fail PIL verify (or a full decode); count and report them once."""
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(lambda p: self._check(p, full), self.paths, chunksize=64))
        for p, reason in zip(self.paths, reasons):
            if reason is not None:
                self.skipped.add(str(p), reason)
        keep = [i for i, reason in enumerate(reasons) if reason is None]
        self.paths = [self.paths[i] for i in keep]
        self.captions = [self.captions[i] for i in keep]

    @property
    def deterministic(self) -> bool:
        """True when item i is always the same array (no random crop/flip): safe to cache."""
        return self.transform.deterministic

    def __len__(self) -> int:
        return len(self.paths)

    # ------------------------------------------------------------------ latent cache
    def cache_variants(self, i: int) -> list[tuple[str, bool]]:
        """(cache key, flip) of every form item i takes: unflipped, and flipped when flips are on."""
        if self.transform.crop == "random":
            raise ConfigError(
                f"model.params.cache_latents with data.params.train.params.crop: random (image "
                f"folder {self.root}): caching latents with crop='random' would freeze one crop "
                "per image; set crop: center (with buckets only the few pixels that do not fit "
                "are cut), or model.params.cache_latents: false to keep random crops"
            )
        if self._digests is None:
            self._digests = {}
        digest = self._digests.get(i)
        if digest is None:
            digest = self._digests[i] = file_digest(self.paths[i])
        target = self.item_buckets[i] if self.item_buckets is not None else None
        described = {
            "size": self.transform.size,
            "bucket": target,
            "crop": self.transform.crop,
            "interpolation": int(self.transform.interpolation),
            "background": list(self.background),
        }
        flips = (False, True) if self.transform.flip_p > 0 else (False,)
        return [(entry_key(digest, {**described, "flip": f}), f) for f in flips]

    def cache_image(self, i: int, flip: bool) -> tuple[np.ndarray, MicroConditioning]:
        """Item i's image as training sees it (with the given flip) and its micro-conditioning."""
        target = self.item_buckets[i] if self.item_buckets is not None else None
        out = self.transform.apply(load_rgb(self.paths[i], self.background), None, target, flip)
        return out.image, out.micro

    def use_latent_cache(self, store: LatentStore | None) -> None:
        """Items carry cached encodings (``MOMENTS_KEY``) instead of images (None: images again)."""
        self.latent_store = store

    def _load_cached(self, i: int) -> dict[str, Any]:
        flip = self.transform.flip_p > 0 and random.random() < self.transform.flip_p
        key = dict((f, k) for k, f in self.cache_variants(i))[flip]
        if key not in self.latent_store:
            raise BadImageError("not in the latent cache (it failed to encode)")
        stored = self.latent_store.get(key)
        item: dict[str, Any] = {MOMENTS_KEY: stored["value"]}
        caption = self.caption(i)
        if caption is not None:
            item[self.caption_key] = caption
        micro = MicroConditioning(
            tuple(stored["original"].tolist()),
            tuple(stored["crop"].tolist()),
            tuple(stored["target"].tolist()),
        )
        item.update(micro.as_item())
        if self.return_path:
            item["file_path_"] = str(self.paths[i])
        return item

    def _load(self, i: int) -> dict[str, Any]:
        if self.latent_store is not None:
            return self._load_cached(i)
        img = load_rgb(self.paths[i], self.background)
        target = self.item_buckets[i] if self.item_buckets is not None else None
        out = self.transform.apply(img, target=target)
        item: dict[str, Any] = {self.image_key: out.image}
        caption = self.caption(i)
        if caption is not None:
            item[self.caption_key] = caption
        item.update(out.micro.as_item())
        if self.return_path:
            item["file_path_"] = str(self.paths[i])
        return item

    def set_epoch(self, epoch: int) -> None:
        """The epoch caption options draw for (shared with DataLoader workers)."""
        self._epoch.fill_(int(epoch))

    @property
    def random_captions(self) -> bool:
        """True when captions change between draws (shuffled / dropped tags)."""
        return self.caption_processor is not None and self.caption_processor.is_random

    def caption(self, i: int) -> str | None:
        """Caption of item i this epoch: the caption options applied (``captions:``), seeded by
        (seed, epoch, i) so it does not depend on workers or ranks."""
        caption = self.captions[i]
        if self.caption_processor is None:
            return caption
        epoch = int(self._epoch)
        return self.caption_processor(caption or "", item_rng(self.seed, epoch, i), epoch)

    def _candidates(self, i: int) -> list[int]:
        """Item i and the items that may stand in for it: the next ones (in its bucket)."""
        if self.item_buckets is None:
            n = len(self.paths)
            return [(i + k) % n for k in range(min(n, MAX_SUBSTITUTES))]
        if self._members is None:
            self._members = {}
            for j, b in enumerate(self.item_buckets):
                self._members.setdefault(b, []).append(j)
        same = self._members[self.item_buckets[i]]
        at = bisect.bisect_left(same, i)
        return (same[at:] + same[:at])[:MAX_SUBSTITUTES]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Item i, or (if file i fails to decode) the next decodable one, deterministically."""
        n = len(self.paths)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        for j in self._candidates(i):
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except BadImageError as exc:
                self._bad.add(j)
                self.skipped.warn_once(str(self.paths[j]), str(exc))
        raise RuntimeError(
            f"image folder {self.root}: {MAX_SUBSTITUTES} consecutive images starting at index {i} "
            f"failed to decode ({self.skipped.summary()}); check the files or use validate='full'"
        )
