"""Captions of an image folder: rows of its ``metadata.jsonl`` / ``metadata.csv`` (Hugging Face
imagefolder), each with its line number so that a bad line is reported as ``FILE:LINE: what is
wrong``, and sidecar ``.txt`` files. All are UTF-8 with or without a byte-order mark."""

from __future__ import annotations

import codecs
import csv
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["read_caption_file", "read_metadata", "read_rows"]

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "txt", "prompt")


def _line_of(path: Path, byte_offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(byte_offset).count(b"\n") + 1


def _text(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark (Excel "CSV UTF-8", Notepad)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
        raise ValueError(
            f"{path}:{_line_of(path, start)}: not UTF-8 text ({err.reason}); save the file "
            "as UTF-8."
        ) from None


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not a JSON object ({exc})") from exc
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}:{n}: expected a JSON object like "
                f'{{"file_name": "a.png", "text": "..."}}, found a {type(row).__name__}'
            )
        rows.append((n, row))
    return rows


def _csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    import io

    reader = csv.DictReader(io.StringIO(_text(path), newline=""), strict=True)
    rows = []
    try:
        for row in reader:
            n = reader.line_num
            header = reader.fieldnames or []
            if None in row:  # more fields than the header has
                raise ValueError(
                    f"{path}:{n}: {len(header) + len(row[None])} fields, the header has "
                    f"{len(header)} ({', '.join(header)}); quote values that hold commas"
                )
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise ValueError(
                    f"{path}:{n}: {len(header) - len(missing)} fields, the header has "
                    f"{len(header)} ({', '.join(header)}); missing {', '.join(missing)}"
                )
            rows.append((n, row))
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc
    return rows


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of every row of a metadata.jsonl / metadata.csv file."""
    path = Path(path)
    return _jsonl(path) if path.suffix == ".jsonl" else _csv(path)


def read_caption_file(path: Path) -> str:
    """A sidecar caption: UTF-8 with or without a byte-order mark (Notepad), stripped."""
    return path.read_text(encoding="utf-8-sig", errors="replace").strip()


def read_metadata(
    root: Path, recursive: bool = True, caption_column: str | None = None
) -> dict[Path, str]:
    """Map image path -> caption from every metadata.jsonl/.csv (file_name relative to its folder).

    A file listed twice keeps its last row's caption (a warning names the metadata file, the
    count and the first repeated name)."""
    captions: dict[Path, str] = {}
    for name in METADATA_FILES:
        for meta in sorted(root.glob(f"**/{name}" if recursive else name)):
            repeated: list[tuple[int, str]] = []
            for n, row in read_rows(meta):
                if "file_name" not in row:
                    raise ValueError(
                        f"{meta}:{n}: no 'file_name' column (found {sorted(row)}); the Hugging "
                        "Face imagefolder convention is one row per image with 'file_name' and 'text'"
                    )
                columns = (caption_column,) if caption_column else CAPTION_COLUMNS
                text = next((row[c] for c in columns if c in row and row[c] is not None), None)
                if text is None:
                    raise ValueError(
                        f"{meta}:{n}: no caption column; expected one of {list(columns)}, "
                        f"found {sorted(row)}"
                    )
                path = (meta.parent / str(row["file_name"])).resolve()
                if path in captions:
                    repeated.append((n, str(row["file_name"])))
                captions[path] = str(text).strip()
            if repeated:
                n, first = repeated[0]
                logger.warning(
                    "%s: %d row(s) repeat a file_name listed before (first: %r on line %d); the "
                    "last row's caption is used; keep one row per image",
                    meta,
                    len(repeated),
                    first,
                    n,
                )
    return captions
