"""Textual-inversion embedding files: A1111 (.pt / .safetensors, SDXL clip_l + clip_g) and diffusers.

Formats (Gal et al. 2022 learn one or more vectors per new token):
- A1111 ``.pt``: ``{"string_to_param": {"*": [n, d]}, "string_to_token", "name", "step", ...}``
  (the original textual-inversion code stores an ``nn.ParameterDict``); the token is the file stem.
- A1111 ``.safetensors``: ``{"emb_params": [n, d]}``; the token is the file stem.
- SDXL (A1111, .safetensors or .pt): ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
- diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{token: [d] or [n, d]}``; for SDXL a
  second file ``learned_embeds_2.*`` holds the vectors of the second (bigG) encoder.
Pickles load with ``torch.load(weights_only=True)`` and our allow-list: never plain unpickling.
Writing: ``a1111`` puts one token per file (several tokens: ``path`` is a folder, one
``<token>.safetensors`` each), ``.pt`` or ``.safetensors`` by suffix; ``diffusers`` puts all tokens
in one file, SDXL's clip_g vectors in its ``learned_embeds_2`` sibling.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.adapters.embeddings_errors import EmbeddingError
from ldm.checkpoint.safe_load import UnsafeCheckpointError, safe_globals

logger = logging.getLogger(__name__)

ANY_ENCODER = "*"  # part name of vectors for one text encoder, whichever has their width
SDXL_PARTS = ("clip_l", "clip_g")
FORMATS = ("a1111", "diffusers")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
_A1111_TOKEN_ID = 265  # the id of "*" that A1111 writes into string_to_token

#: width of a single-encoder file -> what it was made for, for messages.
FILE_FAMILIES = {
    768: "SD v1 (CLIP ViT-L, 768)",
    1024: "SD v2 (OpenCLIP ViT-H, 1024)",
    1280: "SDXL's second encoder (OpenCLIP ViT-bigG, 1280)",
}


@dataclass
class EmbeddingFile:
    """One token read from an embedding file: its vectors per part (``*`` or clip_l / clip_g)."""

    token: str
    vectors: dict[str, torch.Tensor]  # part -> [n, d]
    format: str  # "a1111" | "a1111-sdxl" | "diffusers" | "diffusers-sdxl"
    paths: list[Path] = field(default_factory=list)  # the file(s) it came from
    step: int | None = None

    def describe(self) -> str:
        """What the file was made for: ``SD v1 (CLIP ViT-L, 768)``, ``SDXL (clip_l 768 + ...)``."""
        return describe_parts(self.vectors)


def describe_parts(vectors: Mapping[str, torch.Tensor]) -> str:
    """The model family a set of parts was made for, in words."""
    if set(vectors) == {ANY_ENCODER}:
        d = int(vectors[ANY_ENCODER].shape[-1])
        return FILE_FAMILIES.get(d, f"a text encoder of width {d}")
    parts = " + ".join(f"{k} {int(v.shape[-1])}" for k, v in vectors.items())
    return f"SDXL ({parts})"


# ---------------------------------------------------------------------------------- reading
def _load_pickle(path: Path) -> Any:
    """A torch pickle, tensors and plain containers only (plus the ParameterDict of old files)."""
    allowed = safe_globals() + [torch.nn.ParameterDict]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"Refusing to load the embedding file {path}: its pickle needs objects outside "
                f"the allow-list, which could run code from the file ({str(err).strip()[:300]}). "
                "Embedding files hold tensors only; ask for a .safetensors version."
            ) from None


def _load(path: Path) -> dict[str, Any]:
    from ldm.checkpoint.integrity import LOAD_ERRORS, check_checkpoint_file, damaged

    suffix = path.suffix.lower()
    if suffix == ".safetensors" or suffix in TORCH_SUFFIXES:
        check_checkpoint_file(path)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise damaged(path, err) from None
    elif suffix in TORCH_SUFFIXES:
        try:
            data = _load_pickle(path)
        except UnsafeCheckpointError:
            raise
        except LOAD_ERRORS as err:
            raise damaged(path, err) from err
    else:
        raise EmbeddingError(
            f"Embedding file {path}: unknown suffix '{path.suffix}'; expected .safetensors or "
            f"one of {', '.join(TORCH_SUFFIXES)}."
        )
    if not isinstance(data, dict):
        raise EmbeddingError(
            f"Embedding file {path} holds a {type(data).__name__}, expected a dict."
        )
    return data


def _matrix(value: Any, path: Path, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise EmbeddingError(
            f"Embedding file {path}: '{key}' is {shape}; expected a tensor [n_vectors, width]."
        )
    return value.detach().reshape(-1, value.shape[-1])  # [d] -> [1, d]


def sibling_path(path: Path) -> Path:
    """The second-encoder file of a diffusers SDXL embedding (``learned_embeds_2.*``)."""
    stem = path.stem
    if "learned_embeds" in stem:
        stem = stem.replace("learned_embeds", "learned_embeds_2", 1)
    else:
        stem += "_2"
    return path.with_name(stem + path.suffix)


def _diffusers_dir(path: Path) -> Path:
    for name in DIFFUSERS_NAMES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"Embedding folder {path} holds none of {list(DIFFUSERS_NAMES)}; pass the file itself."
    )


def _refuse_lora(data: Mapping[Any, Any], path: Path) -> None:
    """EmbeddingError sending a LoRA file given as an embedding to --lora (before its keys are
    taken for token names)."""
    from ldm.checkpoint.file_kinds import lora_key

    key = lora_key(map(str, data))
    if key is not None:
        raise EmbeddingError(
            f"{path} is a LoRA file, not a textual-inversion embedding (key `{key}`): pass it "
            f"with --lora {path}[:SCALE] (generate(loras=...))."
        )


def read_embeddings(path: str | os.PathLike, token: str | None = None) -> list[EmbeddingFile]:
    """The tokens of an embedding file or folder; ``token`` overrides the name (stem / key)."""
    path = Path(path)
    if path.is_dir():
        path = _diffusers_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"Embedding file not found: {path}")
    data = _load(path)
    _refuse_lora(data, path)
    name = token or path.stem
    if "string_to_param" in data:  # A1111 / original textual inversion
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # nn.ParameterDict of older files
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(
                f"Embedding file {path}: 'string_to_param' must hold exactly one entry (found "
                f"{list(params) if isinstance(params, Mapping) else type(params).__name__})."
            )
        ((key, value),) = params.items()
        step = data.get("step")
        vectors = {ANY_ENCODER: _matrix(value, path, f"string_to_param.{key}")}
        step = int(step) if isinstance(step, int | float | torch.Tensor) else None
        return [EmbeddingFile(name, vectors, "a1111", [path], step)]
    if "emb_params" in data:
        vectors = {ANY_ENCODER: _matrix(data["emb_params"], path, "emb_params")}
        return [EmbeddingFile(name, vectors, "a1111", [path])]
    if any(k in data for k in SDXL_PARTS):
        vectors = {k: _matrix(data[k], path, k) for k in SDXL_PARTS if k in data}
        return [EmbeddingFile(name, vectors, "a1111-sdxl", [path])]
    if data and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        return _read_diffusers(path, data, token)
    raise EmbeddingError(
        f"Embedding file {path} is not a textual-inversion embedding: top-level keys "
        f"{sorted(map(str, data))[:10]}. Expected 'string_to_param' (A1111 .pt), 'emb_params' "
        "(A1111 .safetensors), 'clip_l'/'clip_g' (SDXL) or token -> tensor (diffusers)."
    )


def _read_diffusers(
    path: Path, data: dict[str, torch.Tensor], token: str | None
) -> list[EmbeddingFile]:
    if token is not None and len(data) != 1:
        raise EmbeddingError(
            f"Embedding file {path} holds {len(data)} tokens {sorted(data)}; a token name "
            "override needs a file with exactly one."
        )
    second: dict[str, Any] = {}
    other = sibling_path(path)
    if other != path and other.is_file():
        second = _load(other)
        if set(second) != set(data):
            raise EmbeddingError(
                f"diffusers SDXL embedding: {path} holds tokens {sorted(data)} but {other} holds "
                f"{sorted(map(str, second))}; the two files must hold the same tokens."
            )
        logger.info("Embedding %s: the second text encoder's vectors come from %s", path, other)
    out = []
    for key, value in data.items():
        if second:
            vectors = {
                "clip_l": _matrix(value, path, key),
                "clip_g": _matrix(second[key], other, key),
            }
            out.append(EmbeddingFile(token or key, vectors, "diffusers-sdxl", [path, other]))
        else:
            vectors = {ANY_ENCODER: _matrix(value, path, key)}
            out.append(EmbeddingFile(token or key, vectors, "diffusers", [path]))
    return out


# ---------------------------------------------------------------------------------- writing
def _save(tensors: dict[str, Any], path: Path) -> None:
    from ldm.atomic_output import atomic_path

    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in TORCH_SUFFIXES:
        raise EmbeddingError(
            f"Embedding file {path}: unknown suffix '{path.suffix}'; use .safetensors, .pt or .bin."
        )
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            from ldm.checkpoint.prune import to_saveable

            save_file(to_saveable({k: v.detach().cpu() for k, v in tensors.items()}), str(tmp))
        else:
            with open(tmp, "wb") as f:
                torch.save(tensors, f)


def _check_parts(token: str, vectors: Mapping[str, torch.Tensor]) -> None:
    if set(vectors) != {ANY_ENCODER} and not (vectors and set(vectors) <= set(SDXL_PARTS)):
        raise EmbeddingError(
            f"'{token}': parts {sorted(vectors)}; an embedding file holds either one set of "
            f"vectors ('{ANY_ENCODER}') or SDXL's {list(SDXL_PARTS)}."
        )


def write_embeddings(
    path: str | os.PathLike,
    embeddings: Mapping[str, Mapping[str, torch.Tensor]],
    format: str = "a1111",
    step: int | None = None,
) -> list[Path]:
    """Write ``{token: {part: [n, d]}}`` as A1111 or diffusers files; returns the files written."""
    if format not in FORMATS:
        raise EmbeddingError(
            f"write_embeddings: format={format!r}; expected one of {list(FORMATS)}."
        )
    path = Path(path)
    for token, vectors in embeddings.items():
        _check_parts(token, vectors)
    if format == "diffusers":
        return _write_diffusers(path, embeddings)
    if len(embeddings) == 1 and path.suffix:
        ((token, vectors),) = embeddings.items()
        if path.stem != token:
            logger.warning(
                "A1111 names an embedding after its file: '%s' will load as '%s' there.",
                token,
                path.stem,
            )
        _write_a1111(path, token, vectors, step)
        return [path]
    if path.suffix:
        raise EmbeddingError(
            f"write_embeddings: A1111 files hold one embedding each, but {len(embeddings)} tokens "
            f"go to the file {path}. Pass a folder (one <token>.safetensors each) or use "
            "format='diffusers'."
        )
    written = []
    for token, vectors in embeddings.items():
        if os.sep in token or (os.altsep and os.altsep in token):
            raise EmbeddingError(f"'{token}' cannot be a file name; save it with an explicit path.")
        written.append(path / f"{token}.safetensors")
        _write_a1111(written[-1], token, vectors, step)
    return written


def _write_a1111(
    path: Path, token: str, vectors: Mapping[str, torch.Tensor], step: int | None
) -> None:
    if set(vectors) != {ANY_ENCODER}:
        _save({k: v.detach().cpu() for k, v in vectors.items()}, path)
    elif path.suffix.lower() == ".safetensors":
        _save({"emb_params": vectors[ANY_ENCODER]}, path)
    else:
        _save(
            {
                "string_to_token": {"*": _A1111_TOKEN_ID},
                "string_to_param": {"*": vectors[ANY_ENCODER].detach().cpu().clone()},
                "name": token,
                "step": step,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
            },
            path,
        )


def _write_diffusers(
    path: Path, embeddings: Mapping[str, Mapping[str, torch.Tensor]]
) -> list[Path]:
    kinds = {frozenset(v) for v in embeddings.values()}
    if len(kinds) != 1:
        raise EmbeddingError(
            "diffusers format: all tokens of one file must be for the same encoders; found "
            f"{sorted(sorted(k) for k in kinds)}. Save them separately."
        )
    parts = sorted(next(iter(kinds)))
    if parts == [ANY_ENCODER]:
        _save({t: v[ANY_ENCODER].detach().cpu() for t, v in embeddings.items()}, path)
        return [path]
    if parts != sorted(SDXL_PARTS):
        raise EmbeddingError(
            f"diffusers format for SDXL needs both {list(SDXL_PARTS)} for every token, found "
            f"{parts}."
        )
    other = sibling_path(path)
    _save({t: v["clip_l"].detach().cpu() for t, v in embeddings.items()}, path)
    _save({t: v["clip_g"].detach().cpu() for t, v in embeddings.items()}, other)
    return [path, other]
