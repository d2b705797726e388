"""The text encoders of an engine and their token-embedding tables: find, grow, shrink.

Textual inversion (Gal et al. 2022) adds tokens to a text encoder: ids from the tokenizer's
vocabulary size upward, and rows at those ids in the token-embedding table. Both encoder kinds
are covered: transformers' ``CLIPTextModel`` at ``.transformer`` (``FrozenCLIPEmbedder``,
``CLIPTextEncoder``) and open_clip's text tower at ``.model`` (``FrozenOpenCLIPEmbedder``,
``FrozenOpenCLIPEmbedder2``). The first added token gives the encoder a private copy of its
tokenizer (the ``get_tokenizer`` instances are shared); removing the last one restores the
original tokenizer, table and pooling settings exactly.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ldm.adapters.embeddings_errors import EmbeddingError
from ldm.modules.encoders.tokenizer import EOS_ID, CLIPTokenizer

logger = logging.getLogger(__name__)

_OWNERS = "_ldm_token_owners"  # encoder attribute: added token -> owner serial
_BASE = "_ldm_token_base"  # encoder attribute: what the first added token changed
_SERIALS = itertools.count(1)

#: (kind, width) -> the models such an encoder belongs to, for messages.
FAMILIES = {
    ("clip", 768): "CLIP ViT-L: SD v1, SDXL clip_l",
    ("open_clip", 1024): "OpenCLIP ViT-H: SD v2",
    ("open_clip", 1280): "OpenCLIP ViT-bigG: SDXL clip_g",
}
_KIND_NAMES = {"clip": "clip_l", "open_clip": "clip_g"}  # names in an SDXL-style conditioner


def new_owner() -> int:
    """A fresh owner id for the tokens one loader or trainer adds."""
    return next(_SERIALS)


def encoder_kind(module: Any) -> str | None:
    """``"clip"`` (transformers CLIPTextModel), ``"open_clip"``, or None if not a text encoder."""
    if not isinstance(module, nn.Module) or not isinstance(
        getattr(module, "tokenizer", None), CLIPTokenizer
    ):
        return None
    inner = getattr(module, "transformer", None)
    if inner is not None and hasattr(inner, "get_input_embeddings"):
        return "clip"
    inner = getattr(module, "model", None)
    if isinstance(getattr(inner, "token_embedding", None), nn.Embedding):
        return "open_clip"
    return None


def token_embedding(module: nn.Module) -> nn.Embedding:
    """The token-embedding table of a text encoder."""
    kind = encoder_kind(module)
    if kind == "clip":
        return module.transformer.get_input_embeddings()
    if kind == "open_clip":
        return module.model.token_embedding
    raise EmbeddingError(
        f"{type(module).__name__} is not a text encoder with a CLIP tokenizer and a token "
        "embedding (expected FrozenCLIPEmbedder, CLIPTextEncoder or FrozenOpenCLIPEmbedder[2])."
    )


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of an engine: its name there, the module, its kind."""

    name: str  # "text" (cond_stage_model), "clip_l" / "clip_g" (conditioner), "embedders.N"
    module: nn.Module = field(repr=False)
    kind: str  # "clip" | "open_clip"

    @property
    def embedding(self) -> nn.Embedding:
        """The token-embedding table (``nn.Embedding`` [vocab, width])."""
        return token_embedding(self.module)

    @property
    def width(self) -> int:
        """Width of a token vector."""
        return int(self.embedding.embedding_dim)

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The tokenizer the encoder uses for prompts."""
        return self.module.tokenizer

    def describe(self) -> str:
        """``"clip_l: CLIP text encoder, width 768 (CLIP ViT-L: SD v1, SDXL clip_l)"``."""
        kind = "CLIP" if self.kind == "clip" else "OpenCLIP"
        family = FAMILIES.get((self.kind, self.width))
        return f"{self.name}: {kind} text encoder, width {self.width}" + (
            f" ({family})" if family else ""
        )


def text_encoders(engine: nn.Module) -> list[TextEncoder]:
    """The text encoders of an engine (or a bare encoder), in conditioning order."""
    kind = encoder_kind(engine)
    if kind is not None:
        return [TextEncoder("text", engine, kind)]
    found: list[TextEncoder] = []
    cond = getattr(engine, "cond_stage_model", None)
    kind = encoder_kind(cond)
    if kind is not None:
        found.append(TextEncoder("text", cond, kind))
    embedders = getattr(getattr(engine, "conditioner", None), "embedders", None)
    if isinstance(embedders, nn.ModuleList):
        pairs = [(i, m, encoder_kind(m)) for i, m in enumerate(embedders)]
        pairs = [(i, m, k) for i, m, k in pairs if k is not None]
        names = [_KIND_NAMES[k] for _, _, k in pairs]
        unique = len(set(names)) == len(names)
        for (i, m, k), name in zip(pairs, names, strict=True):
            found.append(TextEncoder(name if unique else f"embedders.{i}", m, k))
    if not found:
        raise EmbeddingError(
            f"{type(engine).__name__} has no text encoder with a CLIP tokenizer: looked at "
            f"cond_stage_model ({type(cond).__name__}) and conditioner.embedders. Textual "
            "inversion needs FrozenCLIPEmbedder, CLIPTextEncoder or FrozenOpenCLIPEmbedder[2]."
        )
    return found


def token_owner(encoder: nn.Module, token: str) -> int | None:
    """Who added ``token`` to ``encoder`` (an id from ``new_owner``), None if nobody did."""
    return getattr(encoder, _OWNERS, {}).get(token)


def _replace_weight(embedding: nn.Embedding, weight: torch.Tensor) -> None:
    old = embedding.weight
    embedding.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    embedding.num_embeddings = int(weight.shape[0])


def _set_vocab_size(encoder: nn.Module, kind: str, n: int) -> None:
    if kind == "clip":
        encoder.transformer.config.vocab_size = n
    elif hasattr(encoder.model, "vocab_size"):
        encoder.model.vocab_size = n


def add_token_rows(encoder: nn.Module, token: str, rows: torch.Tensor, owner: int) -> list[int]:
    """Add ``token`` with ``rows`` [n, width] (old rows bit-exact, table dtype); returns its ids."""
    kind = encoder_kind(encoder)
    table = token_embedding(encoder)
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] != table.embedding_dim:
        raise EmbeddingError(
            f"'{token}': vectors of shape {tuple(rows.shape)} do not fit the token-embedding "
            f"table of {type(encoder).__name__} (width {table.embedding_dim}); expected "
            f"[n, {table.embedding_dim}]."
        )
    tokenizer = encoder.tokenizer
    if tokenizer.vocab_size != table.num_embeddings:
        raise EmbeddingError(
            f"{type(encoder).__name__}: the tokenizer knows {tokenizer.vocab_size} ids but the "
            f"token-embedding table has {table.num_embeddings} rows, so new ids would not point at "
            "new rows. Textual inversion needs a table with exactly one row per tokenizer id "
            "(vocab_size 49408)."
        )
    if not hasattr(encoder, _BASE):
        base = {"tokenizer": tokenizer, "vocab_size": table.num_embeddings}
        if kind == "clip":
            base["eos_token_id"] = getattr(encoder.transformer, "eos_token_id", None)
            # transformers pools at argmax(input_ids) when eos_token_id == 2, which would pick a
            # new id (> 49407); pooling at the first end token is the same for tokenizer output
            encoder.transformer.eos_token_id = EOS_ID
        setattr(encoder, _BASE, base)
        setattr(encoder, _OWNERS, {})
        encoder.tokenizer = tokenizer = tokenizer.copy()
    ids = tokenizer.add_tokens({token: int(rows.shape[0])})[token]
    old = table.weight.detach()
    with torch.no_grad():
        _replace_weight(table, torch.cat([old, rows.detach().to(old)], dim=0))
    _set_vocab_size(encoder, kind, table.num_embeddings)
    getattr(encoder, _OWNERS)[token] = owner
    return ids


def set_token_rows(encoder: nn.Module, token: str, rows: torch.Tensor) -> None:
    """Overwrite the vectors of an added token (same number of vectors)."""
    ids = encoder.tokenizer.added_tokens[token]
    weight = token_embedding(encoder).weight
    if tuple(rows.shape) != (len(ids), weight.shape[1]):
        raise EmbeddingError(
            f"'{token}': got vectors of shape {tuple(rows.shape)}, the token has "
            f"{len(ids)} x {weight.shape[1]}."
        )
    with torch.no_grad():
        weight[ids[0] : ids[-1] + 1] = rows.to(weight)


def remove_token_rows(encoder: nn.Module, tokens: Iterable[str]) -> None:
    """Remove added tokens and their rows; later ids move down. The last one restores all."""
    tokens = [t for t in tokens if t in encoder.tokenizer.added_tokens]
    if not tokens:
        return
    kind = encoder_kind(encoder)
    table = token_embedding(encoder)
    removed = encoder.tokenizer.remove_tokens(tokens)
    keep = torch.ones(table.num_embeddings, dtype=torch.bool)
    keep[[i for ids in removed.values() for i in ids]] = False
    with torch.no_grad():
        _replace_weight(table, table.weight.detach()[keep.to(table.weight.device)])
    owners = getattr(encoder, _OWNERS, {})
    for token in tokens:
        owners.pop(token, None)
    _set_vocab_size(encoder, kind, table.num_embeddings)
    if encoder.tokenizer.added_tokens or not hasattr(encoder, _BASE):
        return
    base = getattr(encoder, _BASE)
    encoder.tokenizer = base["tokenizer"]
    if kind == "clip":
        encoder.transformer.eos_token_id = base["eos_token_id"]
    delattr(encoder, _BASE)
    delattr(encoder, _OWNERS)
