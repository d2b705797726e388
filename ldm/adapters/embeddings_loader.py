"""Load textual-inversion embeddings into an engine for sampling, and take them out again.

``load_embeddings(engine, paths)`` adds each file's token to every text encoder it was made for
(SDXL: ``clip_l`` to encoder 0, ``clip_g`` to encoder 1; a single-encoder file to the one encoder
of its width) and returns a handle; ``handle.remove()`` (or leaving its ``with`` block) restores
the tokenizers and embedding tables bit for bit. A token loaded again replaces the old vectors.
Token names: ``tokens`` (one per path), else the A1111 file stem or the diffusers key. Every file is
read and checked before the model changes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.adapters.embeddings_encoders import (
    TextEncoder,
    add_token_rows,
    new_owner,
    remove_token_rows,
    text_encoders,
    token_owner,
)
from ldm.adapters.embeddings_errors import EmbeddingError
from ldm.adapters.embeddings_file import (
    ANY_ENCODER,
    SDXL_PARTS,
    EmbeddingFile,
    describe_parts,
    read_embeddings,
)

logger = logging.getLogger(__name__)


def _model_text(encoders: Sequence[TextEncoder]) -> str:
    return "; ".join(e.describe() for e in encoders)


def match_parts(
    vectors: Mapping[str, torch.Tensor], encoders: Sequence[TextEncoder], source: str
) -> dict[str, torch.Tensor]:
    """Which encoder (by name) gets which vectors [n, d]; refuses what fits no encoder."""
    made_for = describe_parts(vectors)
    if set(vectors) == {ANY_ENCODER}:
        rows = vectors[ANY_ENCODER]
        fits = [e for e in encoders if e.width == rows.shape[-1]]
        if len(fits) == 1:
            if len(encoders) > 1:
                logger.warning(
                    "%s (made for %s) goes to %s only; %s read the token as plain text.",
                    source,
                    made_for,
                    fits[0].name,
                    ", ".join(e.name for e in encoders if e is not fits[0]),
                )
            return {fits[0].name: rows}
        why = "fits several of them, which is ambiguous" if fits else "fits none of them"
        raise EmbeddingError(
            f"{source} was made for {made_for}; it {why}. This model's text encoders: "
            f"{_model_text(encoders)}. Use an embedding made for this model family."
        )
    out = {}
    for enc in encoders:
        rows = vectors.get(enc.name)
        if rows is None:
            continue
        if rows.shape[-1] != enc.width:
            raise EmbeddingError(
                f"{source} was made for {made_for}: its '{enc.name}' vectors have width "
                f"{rows.shape[-1]}, but this model's encoder has {enc.width}. This model's text "
                f"encoders: {_model_text(encoders)}."
            )
        out[enc.name] = rows
    counts = {name: int(rows.shape[0]) for name, rows in out.items()}
    if len(set(counts.values())) > 1:  # the encoders' contexts are joined position by position
        raise EmbeddingError(
            f"{source}: its parts hold different numbers of vectors ({counts}); every text "
            "encoder must get the same count, or the tokens after it fall out of step between "
            "the encoders. The file is damaged or was made wrongly."
        )
    if not out:
        raise EmbeddingError(
            f"{source} was made for {made_for} (parts {sorted(vectors)}), but no text encoder of "
            f"this model is named so. This model's text encoders: {_model_text(encoders)}. Use "
            "an embedding made for this model family."
        )
    unused = sorted(set(vectors) - set(out))
    missing = [e.name for e in encoders if e.name not in out]
    if unused or missing:
        logger.warning(
            "%s: parts %s have no encoder here; encoders %s read the token as plain text.",
            source,
            unused,
            missing,
        )
    return out


def file_parts(per_encoder: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vectors by encoder name -> the parts of an embedding file (``*`` or clip_l / clip_g)."""
    if len(per_encoder) == 1:
        return {ANY_ENCODER: next(iter(per_encoder.values()))}
    if not set(per_encoder) <= set(SDXL_PARTS):
        raise EmbeddingError(
            f"Encoders {sorted(per_encoder)}: embedding files name only SDXL's {list(SDXL_PARTS)} "
            "when there are several text encoders."
        )
    return dict(per_encoder)


def remove_everywhere(encoders: Sequence[TextEncoder], token: str) -> bool:
    """Remove ``token`` from every encoder holding it; True if any did."""
    found = False
    for enc in encoders:
        if token in enc.tokenizer.added_tokens:
            remove_token_rows(enc.module, [token])
            found = True
    return found


class EmbeddingsHandle:
    """Loaded embeddings: ``tokens`` (token -> encoder name -> ids); ``remove()`` takes them out."""

    def __init__(self, encoders: Sequence[TextEncoder], owner: int) -> None:
        self.encoders = list(encoders)
        self.owner = owner
        self.tokens: dict[str, dict[str, list[int]]] = {}

    def remove(self) -> None:
        """Remove the tokens this handle added (not those replaced since by another load)."""
        for enc in self.encoders:
            mine = [t for t in self.tokens if token_owner(enc.module, t) == self.owner]
            remove_token_rows(enc.module, mine)
        self.tokens = {}

    def __enter__(self) -> EmbeddingsHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, str | os.PathLike):
        return [value]
    return list(value)


def load_embeddings(
    engine: nn.Module,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokens: str | Sequence[str | None] | None = None,
) -> EmbeddingsHandle:
    """Add the files' tokens (names: ``tokens``, one per path, or stem / key) to ``engine``."""
    path_list = _as_list(paths)
    names = [None] * len(path_list) if tokens is None else _as_list(tokens)
    if len(names) != len(path_list):
        raise EmbeddingError(
            f"load_embeddings: {len(path_list)} paths but {len(names)} token names; give one "
            "name (or None) per path."
        )
    encoders = text_encoders(engine)
    plan: list[tuple[EmbeddingFile, dict[str, torch.Tensor]]] = []
    consumed: set[str] = set()
    for path, name in zip(path_list, names, strict=True):
        if os.path.abspath(path) in consumed:  # the learned_embeds_2 file of an SDXL pair
            continue
        for item in read_embeddings(path, name):
            consumed.update(os.path.abspath(p) for p in item.paths)
            source = f"Embedding '{item.token}' ({item.paths[0]})"
            plan.append((item, match_parts(item.vectors, encoders, source)))
    handle = EmbeddingsHandle(encoders, new_owner())
    by_name = {e.name: e for e in encoders}
    for item, parts in plan:
        if remove_everywhere(encoders, item.token):
            logger.warning("Embedding '%s' was already loaded; replacing it.", item.token)
        handle.tokens.pop(item.token, None)
        ids = {
            n: add_token_rows(by_name[n].module, item.token, r, handle.owner)
            for n, r in parts.items()
        }
        handle.tokens[item.token] = ids
        logger.info(
            "Loaded embedding '%s' (%s, %d vectors) into %s",
            item.token,
            item.format,
            next(iter(parts.values())).shape[0],
            ", ".join(parts),
        )
    return handle
