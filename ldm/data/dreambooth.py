"""DreamBooth data (Ruiz et al. 2023): instance items and, for prior preservation, class items.

Instance data: any data set of CompVis items (``instance: {target, params}``; its captions are
the instance prompts unless ``instance_prompt`` is given) or a folder of images
(``instance_dir`` + ``instance_prompt``, resized and center-cropped to ``size``; without
``instance_prompt`` the folder's own captions, see ``ldm.data.folder``). Class data:
images the model itself made for the class prompts before training, read lazily from
``class_dir`` (``ldm.data.class_images``; made by ``ldm.adapters.dreambooth``). With prior
preservation an epoch interleaves the two kinds: even index instance, odd index class.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sized
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ldm.data.class_images import GENERATOR, ClassImageCache
from ldm.data.image_io import load_rgb
from ldm.data.micro_conditioning import MICRO_CONDITIONING_KEYS, MicroConditioning
from ldm.data.transforms import ImageTransform, to_float_array
from ldm.util import ConfigError, config_path_of, instantiate_from_config

logger = logging.getLogger(__name__)

DEFAULT_FOLDER_SIZE = 512  # diffusers' train_dreambooth --resolution


def _params_path(*subconfigs: Any) -> str:
    """Key path of the data set's params in the user's config (from a nested sub-config)."""
    for sub in subconfigs:
        path = config_path_of(sub) if sub is not None else ""
        if "." in path:
            return path.rsplit(".", 1)[0]
    return "DreamBoothDataset"


def _caption_of(dataset: Any, i: int, caption_key: str, where: str) -> str:
    """Caption of item i: the data set's ``caption(i)`` when it has one (no image decoded)."""
    if callable(getattr(dataset, "caption", None)):
        return str(dataset.caption(i))
    item = dataset[i]
    if caption_key not in item:
        raise ConfigError(
            f"{where}.class_prompts: item {i} of {type(dataset).__name__} has no "
            f"caption under {caption_key!r} (keys: {sorted(item)}); set caption_key or use "
            "class_prompt (one string)."
        )
    return str(item[caption_key])


class DreamBoothDataset(Dataset):
    """Instance items (``prior`` False) interleaved with cached class items (``prior`` True).

    Items: ``{image_key: H x W x 3 float32 in [-1, 1], caption_key: str, prior_key: bool}``, plus
    the SDXL micro-conditioning keys when the instance items carry them (class items: uncropped
    at their size; made at another size, they are resized and center-cropped to the instance
    items' size, which the keys record). Other keys of the instance items are dropped. Length: ``2 * max(n_instance, num_class_images) * repeats`` with
    prior preservation (index 2k: instance k, 2k + 1: class k, each cycled), else
    ``n_instance * repeats``.
    """

    deterministic = False  # class images can be replaced (regenerate): never cache encodings

    def __init__(
        self,
        instance: Mapping[str, Any] | None = None,
        instance_dir: str | os.PathLike | None = None,
        instance_prompt: str | None = None,
        size: int | None = None,
        class_dir: str | os.PathLike | None = None,
        num_class_images: int = 100,
        class_prompt: str | None = None,
        class_prompts: Mapping[str, Any] | None = None,
        prior_preservation: bool | None = None,
        regenerate: bool = False,
        repeats: int = 1,
        image_key: str = "image",
        caption_key: str = "caption",
        prior_key: str = "prior",
        interpolation: str = "bicubic",
    ) -> None:
        self.where = _params_path(instance, class_prompts)  # names the keys in errors
        if (instance is None) == (instance_dir is None):
            raise ConfigError(
                f"{self.where}: give exactly one of instance ({{target, params}}: a data set of "
                "image + caption items) or instance_dir (a folder of images, with "
                f"instance_prompt); found instance={instance!r}, instance_dir={instance_dir!r}."
            )
        if not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"{self.where}: repeats must be an integer >= 1, found {repeats!r}.")
        self.image_key, self.caption_key, self.prior_key = image_key, caption_key, prior_key
        self.instance_prompt = instance_prompt
        self.repeats = repeats
        self.instance = self._build_instance(instance, instance_dir, size, interpolation)
        first = self._instance_item(0)
        self.item_size: tuple[int, int] = tuple(int(s) for s in first[image_key].shape[:2])
        self.micro = all(k in first for k in MICRO_CONDITIONING_KEYS)
        if instance is not None and size is not None and self.item_size != (size, size):
            raise ConfigError(
                f"{self.where}: size={size} applies to instance_dir; the instance data set "
                f"makes {self.item_size[0]}x{self.item_size[1]} items. Set the size in its own "
                "params, or drop size."
            )
        self.interpolation = interpolation

        self.prior_preservation = (
            class_dir is not None if prior_preservation is None else bool(prior_preservation)
        )
        self.cache: ClassImageCache | None = None
        self.num_class_images = 0
        self._class_prompts: list[str] = []
        if self.prior_preservation:
            self._setup_class_data(
                class_dir, num_class_images, class_prompt, class_prompts, regenerate
            )
        elif class_dir is not None:
            logger.info(
                "%s: prior_preservation is off; class_dir %s is not used", self.where, class_dir
            )
        self._verified = False  # all class images found once in this process
        logger.info(
            "DreamBooth data: %d instance items, %d class images (%s), %d items per epoch",
            len(self.instance),
            self.num_class_images,
            self.cache.dir if self.cache else "no prior preservation",
            len(self),
        )

    # ------------------------------------------------------------------ construction
    def _build_instance(
        self, instance: Any, instance_dir: Any, size: int | None, interpolation: str
    ) -> Any:
        if instance is not None:
            dataset = instantiate_from_config(instance)
        else:
            from ldm.data.folder import ImageFolderDataset

            dataset = ImageFolderDataset(
                instance_dir,
                size=size or DEFAULT_FOLDER_SIZE,
                caption_source="none" if self.instance_prompt else "auto",
                image_key=self.image_key,
                caption_key=self.caption_key,
                crop="center",
                interpolation=interpolation,
            )
        if not isinstance(dataset, Sized) or len(dataset) == 0:
            raise ConfigError(
                f"{self.where}: the instance data ({type(dataset).__name__}) must be a "
                "non-empty map-style data set (with __len__)."
            )
        return dataset

    def _setup_class_data(
        self,
        class_dir: Any,
        num_class_images: int,
        class_prompt: str | None,
        class_prompts: Mapping[str, Any] | None,
        regenerate: bool,
    ) -> None:
        if class_dir is None:
            raise ConfigError(
                f"{self.where}: prior_preservation needs class_dir (the folder where the "
                "class images are cached); set it, or prior_preservation: false."
            )
        if (class_prompt is None) == (class_prompts is None):
            raise ConfigError(
                f"{self.where}: with prior preservation give exactly one of class_prompt "
                "(one string, e.g. 'a photo of a dog') or class_prompts ({target, params}: a data "
                "set whose captions are cycled); found "
                f"class_prompt={class_prompt!r}, class_prompts={class_prompts!r}."
            )
        if not isinstance(num_class_images, int) or num_class_images < 1:
            raise ConfigError(
                f"{self.where}: num_class_images must be an integer >= 1, "
                f"found {num_class_images!r}."
            )
        self.num_class_images = num_class_images
        if class_prompt is not None:
            self._class_prompts = [str(class_prompt)] * num_class_images
        else:
            source = instantiate_from_config(class_prompts)
            n = len(source)
            if n == 0:
                raise ConfigError(f"{self.where}: the class_prompts data set is empty.")
            distinct = [
                _caption_of(source, i, self.caption_key, self.where)
                for i in range(min(n, num_class_images))
            ]
            self._class_prompts = [distinct[i % n] for i in range(num_class_images)]
        self.cache = ClassImageCache(class_dir, regenerate=regenerate)
        self.cache.check_prompts(self._class_prompts)

    # ------------------------------------------------------------------ class images
    @property
    def class_dir(self) -> Any:
        """The class-image folder (None without prior preservation)."""
        return self.cache.dir if self.cache else None

    @property
    def class_prompts(self) -> list[str]:
        """The prompt of every class image, in index order."""
        return list(self._class_prompts)

    def class_prompt_of(self, i: int) -> str:
        """Prompt class image i is made for."""
        return self._class_prompts[i]

    def missing_class_images(self) -> list[int]:
        """Indices of the class images not (validly) in class_dir yet."""
        return self.cache.missing(self.num_class_images) if self.cache else []

    def refresh(self) -> None:
        """Look at class_dir again (after the images were made, here or by another process)."""
        if self.cache is not None:
            self.cache.check_prompts(self._class_prompts)
        self._verified = False

    def require_class_images(self) -> None:
        """Raise FileNotFoundError naming the folder and the callback if class images are missing."""
        missing = self.missing_class_images()
        if missing:
            raise FileNotFoundError(
                f"{self.where}: {len(missing)} of {self.num_class_images} class images are "
                f"missing in {self.cache.dir} (first: {self.cache.path(missing[0]).name}"
                f"{'; the folder was made for something else' if self.cache.stale else ''}). They "
                f"are made before training by the callback {GENERATOR} (add it to "
                "lightning.callbacks) or by ldm.adapters.dreambooth.generate_class_images(model, "
                "dataset)."
            )
        self._verified = True

    def _class_item(self, i: int) -> dict[str, Any]:
        img = load_rgb(self.cache.path(i))
        h, w = self.item_size
        if (img.height, img.width) == (h, w):
            image, micro = to_float_array(img), MicroConditioning.uncropped(h, w)
        elif h == w:
            out = ImageTransform(h, crop="center", interpolation=self.interpolation).apply(img)
            image, micro = out.image, out.micro
        else:
            raise ValueError(
                f"{self.cache.path(i)}: {img.height}x{img.width} class image for {h}x{w} instance "
                "images; non-square items need class images of the same size (a model that "
                "makes that size)."
            )
        item: dict[str, Any] = {self.image_key: image, self.caption_key: self.class_prompt_of(i)}
        if self.micro:
            item.update(micro.as_item())
        return item

    # ------------------------------------------------------------------ items
    def _instance_item(self, i: int) -> dict[str, Any]:
        item = self.instance[i]
        if self.image_key not in item:
            raise ConfigError(
                f"{self.where}: instance item {i} has no image under {self.image_key!r} "
                f"(keys: {sorted(item)}); set image_key to the instance data's image key."
            )
        caption = (
            self.instance_prompt if self.instance_prompt is not None else item.get(self.caption_key)
        )
        if caption is None:
            raise ConfigError(
                f"{self.where}: instance item {i} has no caption under {self.caption_key!r} "
                f"(keys: {sorted(item)}); give instance_prompt (e.g. 'a photo of sks dog')."
            )
        out = {
            self.image_key: np.asarray(item[self.image_key], dtype=np.float32),
            self.caption_key: caption,
        }
        out.update({k: item[k] for k in MICRO_CONDITIONING_KEYS if k in item})
        return out

    def _base_length(self) -> int:
        n = len(self.instance)
        return 2 * max(n, self.num_class_images) if self.prior_preservation else n

    def __len__(self) -> int:
        return self._base_length() * self.repeats

    def __getitem__(self, k: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"index {k} out of range for {n} DreamBooth items")
        k = (k % n) % self._base_length()
        if not self.prior_preservation:
            return {**self._instance_item(k % len(self.instance)), self.prior_key: False}
        j = k // 2
        if k % 2 == 0:
            return {**self._instance_item(j % len(self.instance)), self.prior_key: False}
        if not self._verified:
            self.require_class_images()
        i = j % self.num_class_images
        if not self.cache.path(i).is_file():
            self._verified = False
            self.require_class_images()
        return {**self._class_item(i), self.prior_key: True}
