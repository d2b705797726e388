"""Split folders of an image folder, named as Hugging Face's imagefolder names them.

``root/train/``, ``root/test/``, ``root/validation/`` (with their own ``metadata.jsonl``) are
the splits of one data set: a data set reads only the split it is asked for, never all of them
merged (that would train on the test images). The folder names per split are those of
``datasets.data_files`` (``SPLIT_KEYWORDS``), matched case-insensitively.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}


def canonical_split(name: str) -> str | None:
    """'train' / 'validation' / 'test' for any of their folder names ('val' -> 'validation')."""
    low = name.lower()
    return next((split for split, names in SPLIT_FOLDERS.items() if low in names), None)


def split_folders(root: Path) -> dict[str, list[Path]]:
    """Split -> its folders directly under `root` (empty when the root has no split folders)."""
    found: dict[str, list[Path]] = {}
    for child in sorted(root.iterdir()):
        split = canonical_split(child.name) if child.is_dir() else None
        if split is not None:
            found.setdefault(split, []).append(child)
    return found


def split_roots(root: Path, split: str | None) -> tuple[list[Path], str | None]:
    """The folders to read for `split` and the split used (None: the root has no split folders).

    Without split folders the root itself is read (`split` must then be None). With them, only
    the folders of `split` (default 'train') are read, and the choice is logged.
    """
    asked = None if split is None else canonical_split(str(split))
    if split is not None and asked is None:
        raise ConfigError(
            f"image folder {str(root)!r}: split: expected one of {sorted(SPLIT_FOLDERS)} (or a "
            f"folder name of one: {', '.join(n for v in SPLIT_FOLDERS.values() for n in v)}), "
            f"found {split!r}"
        )
    found = split_folders(root)
    if not found:
        if asked is not None:
            raise ConfigError(
                f"image folder {str(root)!r}: split: {split!r} asks for a split folder, but the "
                f"root has none (expected sub-folders like {root / 'train'}, {root / 'test'}); "
                "remove split, or point root at a folder that holds split folders"
            )
        return [root], None
    use = asked or "train"
    if use not in found:
        raise ConfigError(
            f"image folder {str(root)!r}: no {use!r} split folder (found split folders "
            f"{', '.join(p.name for v in found.values() for p in v)}); set split: to one of "
            f"{', '.join(sorted(found))}"
        )
    others = sorted(s for s in found if s != use)
    logger.info(
        "image folder %s: split folders %s; reading split %r (%s)%s",
        root,
        ", ".join(sorted(found)),
        use,
        ", ".join(p.name for p in found[use]),
        f"; set split: to read {' or '.join(repr(s) for s in others)} instead" if others else "",
    )
    return found[use], use
