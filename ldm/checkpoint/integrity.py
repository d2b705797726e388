"""Is a file a checkpoint, and a whole one? Cheap structural checks made before loading.

Reads the first bytes, the `.safetensors` header or the zip directory of a torch file, never the
tensors. What it finds wrong becomes a :class:`CorruptCheckpointError` that names the file, says
what is wrong with it ("truncated: 1.2 GB of an expected 3.9 GB", "not a checkpoint: looks like a
PNG image") and gives one line of advice. Checked:

- empty files;
- other kinds of files by their first bytes: images, archives, documents, an HTML page saved in
  place of a download, a git-lfs pointer, text;
- `.safetensors`: the 8-byte header length, the JSON header, and whether the tensors the header
  lists fit in the file (truncated, or a header that promises more bytes than the file has);
- torch zip files (``torch.save`` since 1.6): the zip directory at the end (a cut-off file has
  none; the size it should have is computed from the tensor list in its ``data.pkl``), and
  whether the archive is a torch checkpoint at all.

Legacy (pre-zip) torch pickles carry no length information; :func:`damaged` words the error that
loading them raises. Flipped bytes inside tensor data are not detected: `.safetensors` has no
checksum, and torch files are memory-mapped without checking their CRCs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from ldm.checkpoint.formats import SAFETENSORS_SUFFIX, TORCH_SUFFIXES, CheckpointFormatError

__all__ = [
    "CorruptCheckpointError",
    "check_checkpoint_file",
    "damaged",
    "human_size",
    "looks_like",
]

#: safetensors refuses headers above this size; a larger length field is not a header at all
MAX_SAFETENSORS_HEADER = 100_000_000
REDOWNLOAD = "Download or copy the file again (compare its size with the source's)."
NOT_A_CHECKPOINT = "Give the path of the checkpoint itself (.ckpt / .safetensors)."

# (magic bytes at offset 0, what the file is) for files that are sometimes saved as checkpoints
_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"BZh", "a bzip2 archive (unpack it first)"),
    (b"\xfd7zXZ\x00", "an xz archive (unpack it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (unpack it first)"),
    (b"Rar!\x1a\x07", "a RAR archive (unpack it first)"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive (unpack it first)"),
]
_TEXT_PREFIXES: list[tuple[str, str]] = [
    (
        "version https://git-lfs",
        "a git-lfs pointer, not the file itself",
    ),
    ("<!doctype html", "an HTML page (a download that saved a login or error page)"),
    ("<html", "an HTML page (a download that saved a login or error page)"),
    ("<?xml", "an XML document (a download that saved an error page)"),
]


class CorruptCheckpointError(CheckpointFormatError):
    """The file is damaged (truncated, empty, a header that lies) or is not a checkpoint."""


def human_size(n: int | float) -> str:
    """Bytes in decimal units: ``1.2 GB``, ``340 kB``, ``12 bytes``."""
    if n < 1000:
        return f"{int(n)} bytes"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000.0
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def looks_like(head: bytes) -> str | None:
    """What a file that is not a checkpoint is, from its first bytes; None when not recognised."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"):
        return "an AVIF/HEIF image"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").decode("utf-8", errors="replace").lower()
    for prefix, what in _TEXT_PREFIXES:
        if text.startswith(prefix):
            return what
    if head[:1] in (b"{", b"[") and _is_text(head):
        return "a JSON text file"
    if _is_text(head):
        return "a text file"
    return None


def _is_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut at the end is still text
        if err.start < len(head) - 4:
            return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) or b >= 128 for b in head)
    return printable / len(head) > 0.95


def _error(path: Path, problem: str, advice: str = REDOWNLOAD) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: {problem}. {advice}")


def _is_safetensors_start(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return head[8:9] == b"{" and 2 <= n <= MAX_SAFETENSORS_HEADER


def check_checkpoint_file(path: str | os.PathLike, verify: bool = False) -> None:
    """Raise :class:`CorruptCheckpointError` when ``path`` is empty, not a checkpoint, or cut off.

    Reads the start of the file and its headers, and for a torch zip file the pickle, checked
    against its CRC-32 (so a changed byte among its names, shapes and numbers is found).
    ``verify``: check the CRC-32 of the tensor data of a torch zip file too (reads the whole
    file). A file that passes may still fail to load (damaged data inside a legacy pickle);
    :func:`damaged` turns that error into a message.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise _error(path, "empty (0 bytes): the download or copy did not finish")
    with open(path, "rb") as f:
        head = f.read(512)
        suffix = path.suffix.lower()
        if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
            if suffix == SAFETENSORS_SUFFIX:
                raise _error(
                    path,
                    "a zip archive (a torch .ckpt file?), not a .safetensors file",
                    "If it is a torch checkpoint, rename it to .ckpt.",
                )
            _check_torch_zip(path, f, size, verify)
            return
        if _is_safetensors_start(head, size):
            if suffix != SAFETENSORS_SUFFIX:
                raise _error(
                    path,
                    f"a .safetensors file named {suffix or 'without a suffix'}",
                    f"Rename it to {path.with_suffix(SAFETENSORS_SUFFIX).name}.",
                )
            _check_safetensors(path, f, size)
            return
        if suffix == SAFETENSORS_SUFFIX:
            what = looks_like(head)
            if size < 8:
                raise _error(path, f"truncated: {size} bytes, less than the 8-byte header length")
            n = struct.unpack("<Q", head[:8])[0]
            if what is not None:
                raise _error(path, f"not a checkpoint: looks like {what}", _advice(what))
            raise _error(
                path,
                f"not a .safetensors file: its first 8 bytes give a header length of {n} bytes "
                f"(the file has {size}) and no JSON header follows",
            )
        if head[:1] == b"\x80":  # a pickle (protocol 2+): legacy torch format, checked on load
            return
        what = looks_like(head)
        if what is not None:
            raise _error(path, f"not a checkpoint: looks like {what}", _advice(what))


def _advice(what: str) -> str:
    if "git-lfs" in what:
        return "Fetch the file itself: git lfs pull (or download it again)."
    if "HTML" in what or "XML" in what:
        return REDOWNLOAD
    return NOT_A_CHECKPOINT


# ------------------------------------------------------------------------------ safetensors
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def _check_safetensors(path: Path, f: BinaryIO, size: int) -> None:
    f.seek(0)
    n = struct.unpack("<Q", f.read(8))[0]
    if 8 + n > size:
        raise _error(
            path,
            f"truncated: {human_size(size)} of an expected {human_size(8 + n)} or more (its "
            f"header alone promises {8 + n} bytes, the file has {size})",
        )
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _error(path, f"damaged: its header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _error(path, f"damaged: its header is a JSON {type(header).__name__}, not an object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        end = max(end, _entry_end(path, name, entry))
    expected = 8 + n + end
    if expected > size:
        raise _error(
            path,
            f"truncated: {human_size(size)} of an expected {human_size(expected)} (its header "
            f"lists tensors up to byte {expected}, the file has {size})",
        )
    if expected < size:
        raise _error(
            path,
            f"damaged: {size - expected} bytes follow the last tensor its header lists (the "
            f"header accounts for {expected} of {size} bytes)",
        )


def _entry_end(path: Path, name: str, entry: Any) -> int:
    """End offset of one header entry's data, after checking that the entry is consistent."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        ok = all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise _error(path, f"damaged: header entry {name!r} is malformed ({entry!r:.200})")
    itemsize = _DTYPE_BYTES.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - begin:
        raise _error(
            path,
            f"damaged: header entry {name!r} says {dtype} {shape} "
            f"({math.prod(shape) * itemsize} bytes) but spans {end - begin} bytes",
        )
    return end


# ------------------------------------------------------------------------------ torch zip
class _Anything:
    """Stands in for every class and callable while a damaged file's pickle is walked."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Anything:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


class _StorageLister(pickle.Unpickler):
    """Walks a torch ``data.pkl`` and records the storages it names; imports and runs nothing."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__(f)
        self.storages: dict[str, int] = {}  # record key -> bytes

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return _Anything

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, storage_type, key, _location, numel = pid
            itemsize = _storage_itemsize(getattr(storage_type, "name", ""))
            if isinstance(numel, int):
                self.storages[str(key)] = numel * itemsize
        return _Anything()


def _storage_itemsize(name: str) -> int:
    import warnings

    import torch

    cls = getattr(torch, name, None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated
            return int(cls.dtype.itemsize)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - UntypedStorage / unknown: numel counts bytes
        return 1


def _expected_zip_size(f: BinaryIO) -> int | None:
    """Lower bound of a torch zip file's full size: its pickle plus every storage it lists."""
    f.seek(0)
    local = f.read(30)
    if len(local) < 30 or not local.startswith(b"PK\x03\x04"):
        return None
    method, name_len, extra_len = (
        struct.unpack("<H", local[8:10])[0],
        *struct.unpack("<HH", local[26:30]),
    )
    if method != 0:  # torch stores records uncompressed
        return None
    name = f.read(name_len)
    if not name.endswith(b"data.pkl"):
        return None
    f.seek(30 + name_len + extra_len)
    lister = _StorageLister(f)
    try:
        lister.load()
    except Exception:  # noqa: BLE001 - the pickle itself is cut off or damaged
        return None
    return f.tell() + sum(lister.storages.values())


def _check_torch_zip(path: Path, f: BinaryIO, size: int, verify: bool) -> None:
    try:
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
            pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            _check_crcs(path, z, names if verify else pickles)
    except CorruptCheckpointError:
        raise
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        NotImplementedError,  # a version or compression field that is damaged
        struct.error,
        KeyError,
        IndexError,
    ) as err:
        expected = _expected_zip_size(f)
        if expected is not None and expected > size:
            raise _error(
                path, f"truncated: {human_size(size)} of an expected {human_size(expected)} or more"
            ) from None
        raise _error(
            path,
            f"truncated or damaged: its zip directory, at the end of the file, is missing "
            f"or unreadable ({err}; the file has {human_size(size)})",
        ) from None
    if not pickles:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise _error(
            path,
            f"not a checkpoint: a zip archive without a torch data.pkl (it holds {shown or 'nothing'})",
            "Unpack it first if it contains the checkpoint.",
        )


def _check_crcs(path: Path, z: zipfile.ZipFile, names: list[str]) -> None:
    """Read ``names`` through the zip reader, which compares each record with its CRC-32."""
    import zlib

    for name in names:
        info = z.getinfo(name)
        if info.CRC == 0 and info.file_size:  # written without checksums
            continue
        try:
            with z.open(info) as record:
                while record.read(1 << 24):
                    pass
        except zipfile.BadZipFile as err:
            what = "fails its CRC-32 checksum" if "CRC" in str(err) else f"is damaged ({err})"
            raise _error(
                path, f"damaged: its record {name!r} {what}: bytes changed after it was written"
            ) from None
        except (
            OSError,
            EOFError,
            zlib.error,
            ValueError,
            NotImplementedError,
            RuntimeError,
        ) as err:
            # RuntimeError: a flag bit that now says "encrypted"
            raise _error(path, f"damaged: its record {name!r} cannot be read ({err})") from None


# ------------------------------------------------------------------------------ load errors
#: exceptions that reading a damaged file raises from torch.load / safetensors
LOAD_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    struct.error,
    zipfile.BadZipFile,
    UnicodeDecodeError,
    OverflowError,
    AssertionError,  # torch's legacy loader asserts on storage keys a damaged pickle lacks
    pickle.UnpicklingError,
)


def damaged(path: str | os.PathLike, err: BaseException) -> CorruptCheckpointError:
    """The error for a file that passed :func:`check_checkpoint_file` but failed to load."""
    path = Path(path)
    text = " ".join(str(err).split())[:300] or type(err).__name__
    kind = "legacy torch pickle" if path.suffix.lower() in TORCH_SUFFIXES else "file"
    if isinstance(err, EOFError) or "EOF" in text:
        problem = f"truncated: the {kind} ends early ({text})"
    else:
        problem = f"damaged: loading failed with {type(err).__name__}: {text}"
    return _error(path, problem)
