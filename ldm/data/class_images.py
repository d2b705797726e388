"""The class-image folder of DreamBooth prior preservation (Ruiz et al. 2023, Sec. 3.3): files and
manifest.

Image i lives in ``class_dir/{i:05d}.png``. ``class_dir/manifest.json`` records what the images
were made for: the class prompt of every index, the image size (h, w), the model fingerprint and
the sampling settings. A folder made for other prompts, another size or another model is never
silently reused: ``ClassImageCache.check_prompts`` / ``check_model`` refuse with what differs and
the fix (``regenerate: true`` replaces it instead).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
IMAGE_NAME = re.compile(r"^\d{5,}\.png$")
GENERATOR = "ldm.adapters.dreambooth.DreamBoothClassImages"  # named in the errors


class ClassImageMismatch(ConfigError):
    """A class-image folder made for other prompts, another size or another model."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_difference(cached: Sequence[str], wanted: Sequence[str]) -> int | None:
    """First index below both lengths where the prompt lists differ, else None."""
    for i, (a, b) in enumerate(zip(cached, wanted)):
        if a != b:
            return i
    return None


class ClassImageCache:
    """``class_dir``: PNG files ``00000.png`` ... and ``manifest.json`` (prompts, size, model)."""

    def __init__(self, class_dir: str | os.PathLike, regenerate: bool = False) -> None:
        self.dir = Path(class_dir).expanduser()
        self.regenerate = bool(regenerate)
        self.stale = False  # the folder holds images made for something else (regenerate: true)

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def path(self, i: int) -> Path:
        """File of class image i."""
        return self.dir / f"{i:05d}.png"

    def image_files(self) -> list[Path]:
        """Every class image file in the folder (names like 00000.png)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if IMAGE_NAME.match(p.name))

    def missing(self, n: int) -> list[int]:
        """Indices below n without a file (all of them when the folder is stale)."""
        if self.stale:
            return list(range(n))
        return [i for i in range(n) if not self.path(i).is_file()]

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when there is none."""
        if not self.manifest_path.is_file():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ClassImageMismatch(
                f"{self.manifest_path}: unreadable ({exc}); delete the folder {self.dir} (its "
                "images are remade) or point class_dir elsewhere."
            ) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ClassImageMismatch(
                f"{self.manifest_path}: expected a class-image manifest of format "
                f"{MANIFEST_FORMAT}, found {str(manifest)[:200]}; delete the folder {self.dir} "
                "or point class_dir elsewhere."
            )
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=1, sort_keys=True)
        write_atomic(self.manifest_path, text.encode("utf-8"))

    def _refuse(self, what: str) -> None:
        """Mark stale (regenerate: true) or raise a ClassImageMismatch naming what differs."""
        if self.regenerate:
            if not self.stale:
                logger.warning(
                    "%s: %s; regenerate: true, so every class image will be made again",
                    self.dir,
                    what,
                )
            self.stale = True
            return
        raise ClassImageMismatch(
            f"class_dir {self.dir}: {what}, so they are not reused. Delete the folder (the "
            f"images are then made again by {GENERATOR}), point class_dir to another folder, or "
            "set regenerate: true in the data set's params to replace them."
        )

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Refuse a folder whose images were made for other prompts (or made by someone else)."""
        self.stale = False
        manifest = self.read_manifest()
        if manifest is None:
            files = self.image_files()
            if files:
                self._refuse(
                    f"{len(files)} images (e.g. {files[0].name}) but no {MANIFEST}: it is not "
                    "known what they were made for"
                )
            return
        cached = list(manifest.get("prompts", []))
        i = _first_difference(cached, prompts)
        if i is not None:
            self._refuse(
                f"the images were made for other class prompts ({self.path(i).name}: made for "
                f"{cached[i]!r}, the data set asks for {prompts[i]!r})"
            )

    def check_model(self, fingerprint: str, size: tuple[int, int]) -> None:
        """Refuse a folder whose images were made by another model or at another size."""
        manifest = None if self.stale else self.read_manifest()
        if manifest is None:
            return
        cached_fp = manifest.get("model", {}).get("fingerprint")
        if cached_fp is not None and cached_fp != fingerprint:
            source = manifest.get("model", {}).get("source", "?")
            self._refuse(
                f"the images were made by another model (fingerprint {cached_fp} from {source}, "
                f"this model's is {fingerprint})"
            )
            return
        cached_size = manifest.get("size")
        if cached_size is not None and tuple(cached_size) != tuple(size):
            self._refuse(
                f"the images were made at another size ({cached_size[0]}x{cached_size[1]}, this "
                f"model makes {size[0]}x{size[1]})"
            )

    def reset(self) -> int:
        """Delete the class images and the manifest (a stale folder being replaced); the count."""
        files = self.image_files()
        for p in files:
            p.unlink()
        self.manifest_path.unlink(missing_ok=True)
        self.stale = False
        logger.info("%s: deleted %d stale class images and the manifest", self.dir, len(files))
        return len(files)

    def merged_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The manifest's prompt list after making ``prompts``: extended, never shortened."""
        manifest = self.read_manifest() or {}
        cached = list(manifest.get("prompts", []))
        return list(prompts) + cached[len(prompts) :]
