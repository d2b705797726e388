"""LoRA and textual-inversion files offered by the UI's pickers (a folder each)."""

from __future__ import annotations

from pathlib import Path

from ldm.ui.errors import UiError

LORA_SUFFIXES = (".safetensors",)
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


def find_files(folder: str | Path | None, suffixes: tuple[str, ...], flag: str) -> dict[str, Path]:
    """Name (the path under ``folder`` without the suffix) -> path of the files with ``suffixes``
    in ``folder`` and its sub-folders; {} when no folder is given."""
    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise UiError(f"{flag} {folder}: no such folder.")
    found: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in suffixes:
            found[p.relative_to(root).with_suffix("").as_posix()] = p
    return found


def lora_files(folder: str | Path | None) -> dict[str, Path]:
    """The LoRA files (kohya or diffusers ``.safetensors``) of ``--lora-dir``."""
    return find_files(folder, LORA_SUFFIXES, "--lora-dir")


def embedding_files(folder: str | Path | None) -> dict[str, Path]:
    """The textual-inversion files (A1111 ``.pt`` / ``.safetensors``, diffusers) of
    ``--embedding-dir``; the file name is the token prompts use."""
    return find_files(folder, EMBEDDING_SUFFIXES, "--embedding-dir")
