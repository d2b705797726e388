"""Rows of an image folder's ``metadata.jsonl`` / ``metadata.csv``, each with its line number, so
that a bad line is reported as ``FILE:LINE: what is wrong``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["read_rows"]


def _line_of(path: Path, byte_offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(byte_offset).count(b"\n") + 1


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}:{_line_of(path, err.start)}: not UTF-8 text ({err.reason}); save the file "
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
