"""WebDataset tar shards (image + .txt/.json caption) streamed with the `webdataset` package.

Shards are split across DataLoader workers and distributed ranks (all nodes): worker w of rank k
reads shards[(k * num_workers + w)::(world_size * num_workers)], so each sample is read once
per epoch when the shard count divides evenly (with fewer shards than readers, every reader
scans all shards and keeps every n-th sample instead). `resampled=True` draws shards with
replacement for an infinite stream; `samples_per_epoch` then sets the epoch length per rank.
Items are CompVis data items with the SDXL micro-conditioning of the transform (original size,
crop offsets, target size; see `ldm.data.micro_conditioning`); undecodable samples are
skipped, counted and reported once.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.shardlists import expand_urls

from ldm.data.buckets import BucketSpec, assign_bucket
from ldm.data.captions import caption_processor_from_config
from ldm.data.folder import images_and_captions
from ldm.data.folder_splits import split_roots
from ldm.data.image_io import IMAGE_EXTENSIONS, BadImageError, SkipLog, load_rgb
from ldm.data.metadata_file import read_caption_file
from ldm.data.shard_ends import all_but_last, is_cut
from ldm.data.transforms import ImageTransform

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
JSON_CAPTION_KEYS = ("caption", "text", "txt", "prompt")
SPLITS = ("auto", "shard", "sample")
MAX_CONSECUTIVE_FAILURES = 1000  # a stream that yields only failures is broken, not unlucky


def expand_shards(urls: str | os.PathLike | Iterable[str]) -> list[str]:
    """Shard list from brace patterns ("data-{000..009}.tar"), "::"-joined lists, dirs or globs."""
    if isinstance(urls, (str, os.PathLike)):
        urls = [os.fspath(urls)]
    out: list[str] = []
    for u in urls:
        u = os.fspath(u)
        if os.path.isdir(u):
            out += sorted(glob.glob(os.path.join(u, "*.tar")))
        elif any(c in u for c in "*?[") and "://" not in u and not u.startswith("pipe:"):
            out += sorted(glob.glob(u))
        else:
            out += expand_urls(u)
    return out


def _process_group() -> tuple[int, int] | None:
    """(rank, world_size) of an initialised torch.distributed process group, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def distributed_info(
    rank: int | None = None, world_size: int | None = None, captured: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(rank, world_size): explicit, else torch.distributed (live, or `captured` in the main
    process), else RANK/WORLD_SIZE env, else (0, 1)."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    live = _process_group() or captured
    if live is not None:
        return live
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def caption_from_sample(
    sample: dict[str, Any], json_keys: tuple[str, ...] = JSON_CAPTION_KEYS
) -> str | None:
    """Caption of a raw webdataset sample from its .txt, else its .json (first key present)."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8-sig", errors="replace").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        for k in json_keys:
            if isinstance(meta, dict) and meta.get(k) is not None:
                return str(meta[k]).strip()
    return None


class WebDatasetShards(IterableDataset):
    """Stream CompVis items from WebDataset tar shards, split over workers and ranks.

    With `samples_per_epoch` the object is a `SizedWebDatasetShards` (has `len`), otherwise it
    has no length, as data loaders expect of a stream.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> WebDatasetShards:
        if cls is WebDatasetShards and kwargs.get("samples_per_epoch") is not None:
            cls = SizedWebDatasetShards
        return super().__new__(cls)

    def __init__(
        self,
        urls: str | list[str],
        size: int | None = 256,
        image_key: str = "image",
        caption_key: str = "caption",
        crop: str = "center",
        flip: bool | float = False,
        interpolation: str = "bicubic",
        shuffle_buffer: int = 0,
        shuffle_shards: bool = True,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        split: str = "auto",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        default_caption: str | None = "",
        json_caption_keys: tuple[str, ...] | list[str] = JSON_CAPTION_KEYS,
        background: tuple[int, int, int] | list[int] = (255, 255, 255),
        buckets: Any = None,
        batch_size: int | None = None,
        captions: Any = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.shards = expand_shards(urls)
        if not self.shards:
            raise ValueError(
                f"no WebDataset shards found for {urls!r}; expected .tar files or a "
                "brace pattern such as 'data/shard-{000000..000009}.tar'"
            )
        missing = [
            s
            for s in self.shards
            if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)
        ]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.shards)} shards do not exist, e.g. {missing[:3]}"
            )
        if resampled and samples_per_epoch is None:
            logger.info(
                "resampled WebDataset stream is infinite: set samples_per_epoch or max_steps"
            )
        self.image_key, self.caption_key = image_key, caption_key
        self.transform = ImageTransform(size, crop=crop, flip=flip, interpolation=interpolation)
        self.shuffle_buffer, self.shuffle_shards = int(shuffle_buffer), shuffle_shards
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.split, self.seed, self.epoch, self._passes = split, int(seed), 0, 0
        self.rank, self.world_size = rank, world_size
        self._group = _process_group()  # DataLoader workers may not see the process group
        self.default_caption = default_caption
        self.json_caption_keys = tuple(json_caption_keys)
        self.background = tuple(background)
        self.caption_processor = caption_processor_from_config(captions)
        self.bucket_spec = BucketSpec.from_config(
            {"resolution": size, **dict(buckets)} if isinstance(buckets, Mapping) else buckets
        )
        if self.bucket_spec is not None and self.transform.size is None:
            raise ValueError("buckets need a size (the bucket area is size x size); got size=None")
        self._bucket_sizes = self.bucket_spec.sizes() if self.bucket_spec else None
        self.batch_size = batch_size  # bucketing: the stream yields batches of one bucket
        self.skipped = SkipLog(
            f"WebDataset {self.shards[0]}{' ...' if len(self.shards) > 1 else ''}"
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned DataLoader workers: carry the main process's rank and world size."""
        state = self.__dict__.copy()
        state["_group"] = _process_group() or self._group
        return state

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: shard order and shuffling change with it (same on every rank/worker).

        Without calls to set_epoch, every new pass in the same process (num_workers=0 or
        persistent workers) counts as the next epoch.
        """
        self.epoch, self._passes = int(epoch), 0

    def _reader(self) -> tuple[int, int, int]:
        """(reader id, number of readers, workers per rank) over all ranks and workers."""
        rank, world = distributed_info(self.rank, self.world_size, self._group)
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nworkers + wid, world * nworkers, nworkers

    def _handler(self, exc: Exception) -> bool:
        self.skipped.warn_once(
            str(exc.args[-1]) if exc.args else "?", f"{type(exc).__name__}: {exc}"
        )
        return True  # continue with the next sample / shard

    def _raw_samples(self, epoch: int, reader: int, readers: int) -> Iterator[dict[str, Any]]:
        if self.resampled:
            rng = random.Random(f"{self.seed}-{epoch}-{reader}")
            empty = 0
            while True:  # infinite: shards drawn with replacement
                src = [{"url": rng.choice(self.shards)}]
                got = False
                for sample in wds.tarfile_samples(src, handler=self._handler):
                    got = True
                    yield sample
                empty = 0 if got else empty + 1
                if empty >= MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(
                        f"{empty} shards in a row gave no samples ({self.skipped.summary()})"
                    )
        shards = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"{self.seed}-{epoch}").shuffle(shards)  # same order on all readers
        by_sample = self.split == "sample" or (self.split == "auto" and len(shards) < readers)
        if not by_sample:
            for url in shards[reader::readers]:
                yield from self._shard_samples(url)
            return
        n = 0
        for url in shards:
            for sample in self._shard_samples(url):
                if n % readers == reader:
                    yield sample
                n += 1

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """The samples of one shard; a cut-off shard's last (maybe incomplete) sample is dropped
        and the shard counted once as skipped (:mod:`ldm.data.shard_ends`)."""
        if not is_cut(url):
            yield from wds.tarfile_samples([{"url": url}], handler=self._handler)
            return

        def quiet(exc: Exception) -> bool:  # the cut's read errors: counted once, below
            import tarfile

            return True if isinstance(exc, tarfile.ReadError) else self._handler(exc)

        def dropped(last: dict[str, Any] | None, n: int) -> None:
            key = f", dropped its last sample {last.get('__key__')}" if last else ""
            self.skipped.warn_once(url, f"shard cut off after {n} complete sample(s){key}")

        samples = wds.tarfile_samples([{"url": url}], handler=quiet)
        yield from all_but_last(samples, dropped)

    @property
    def yields_batches(self) -> bool:
        """True with buckets: the stream yields collated single-bucket batches of batch_size."""
        return self.bucket_spec is not None

    def _decode(
        self, sample: dict[str, Any], rng: random.Random | None = None, epoch: int = 0
    ) -> dict[str, Any] | None:
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            self.skipped.warn_once(
                name, f"no image (found {sorted(k for k in sample if k[0] != '_')})"
            )
            return None
        try:
            caption = caption_from_sample(sample, self.json_caption_keys)
            img = load_rgb(sample[ext], self.background)
        except (BadImageError, ValueError) as exc:
            self.skipped.warn_once(name, str(exc))
            return None
        target = None
        if self.bucket_spec is not None:
            target = assign_bucket(
                (img.height, img.width),
                self._bucket_sizes,
                self.bucket_spec.step,
                self.bucket_spec.upscale,
            )
        out = self.transform.apply(img, target=target)
        item: dict[str, Any] = {self.image_key: out.image}
        if caption is None:
            caption = self.default_caption
        if self.caption_processor is not None and rng is not None:
            caption = self.caption_processor(caption or "", rng, epoch)
        if caption is not None:
            item[self.caption_key] = caption
        item.update(out.micro.as_item())
        return item

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict]:
        """Shuffle raw (still encoded) samples through a buffer of `shuffle_buffer` entries."""
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _items(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch + self._passes
        self._passes += 1
        reader, readers, nworkers = self._reader()
        limit = None
        if self.samples_per_epoch is not None:  # per rank -> per worker
            wid = reader % nworkers
            limit = self.samples_per_epoch // nworkers + (wid < self.samples_per_epoch % nworkers)
        info = get_worker_info()
        rng = random.Random(f"{self.seed}-{epoch}-{reader}-{info.seed if info else 0}")
        count = failed = 0
        for sample in self._shuffled(self._raw_samples(epoch, reader, readers), rng):
            if limit is not None and count >= limit:
                return
            item = self._decode(sample, rng, epoch)
            if item is None:
                failed += 1
                if failed >= MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(
                        f"{failed} consecutive WebDataset samples failed to decode "
                        f"({self.skipped.summary()}); check the shards"
                    )
                continue
            failed = 0
            count += 1
            yield item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items = self._items()
        if self.bucket_spec is None:
            yield from items
            return
        if not self.batch_size:
            raise ValueError(
                "WebDataset buckets: batch_size is not set; the data module sets it from "
                "data.params.batch_size (or pass batch_size=...)"
            )
        pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for item in items:
            key = tuple(item[self.image_key].shape[:2])
            group = pending.setdefault(key, [])
            group.append(item)
            if len(group) == self.batch_size:
                yield default_collate(pending.pop(key))
        for key in sorted(pending):  # the rest of each bucket, smaller batches
            yield default_collate(pending[key])


class SizedWebDatasetShards(WebDatasetShards):
    """A WebDataset stream of known length: `samples_per_epoch` items per rank and epoch."""

    def __len__(self) -> int:
        return int(self.samples_per_epoch)


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
) -> list[str]:
    """Write samples ({"__key__", "<ext>": bytes, "txt": str, "json": dict}) to numbered tar shards."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    writer = None
    for n, sample in enumerate(samples):
        if n % samples_per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(str(out / f"{prefix}-{len(paths):06d}.tar"))
            writer = wds.TarWriter(paths[-1])
        writer.write(sample)
    if writer is not None:
        writer.close()
    return paths


def folder_samples(
    root: str | os.PathLike, caption_source: str = "auto", split: str | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples of an image folder (original bytes, no re-encoding) with their captions.

    With split folders (train/, test/, ...: ``ldm.data.folder_splits``) only `split` (default
    'train') is read."""
    root = Path(root)
    roots, _ = split_roots(root, split)
    paths, metadata = images_and_captions(
        roots, IMAGE_EXTENSIONS, metadata=caption_source in ("auto", "metadata")
    )
    for i, p in enumerate(paths):
        sample: dict[str, Any] = {
            "__key__": f"{i:09d}",
            p.suffix.lower().lstrip("."): p.read_bytes(),
        }
        txt = p.with_suffix(".txt")
        text = metadata.get(p.resolve())
        if text is None and caption_source in ("auto", "txt") and txt.is_file():
            text = read_caption_file(txt)
        if text is not None:
            sample["txt"] = text
        sample["json"] = {
            "file_name": str(p.relative_to(root)),
            **({"caption": text} if text else {}),
        }
        yield sample


def folder_to_shards(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    caption_source: str = "auto",
    prefix: str = "shard",
    split: str | None = None,
) -> list[str]:
    """Pack an image folder (captions from metadata.jsonl or sidecar .txt) into tar shards; with
    split folders, only `split` (default 'train')."""
    samples = folder_samples(root, caption_source, split)
    paths = write_shards(samples, out_dir, samples_per_shard, prefix)
    if not paths:
        raise ValueError(f"no images found under {root!r} to write into shards")
    return paths


def image_bytes(array_uint8: Any, fmt: str = "PNG") -> bytes:
    """Encode an H x W x 3 uint8 array as image bytes (for writing synthetic data to shards)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array_uint8).save(buf, format=fmt)
    return buf.getvalue()
