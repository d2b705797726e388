"""Textual inversion training mechanics (Gal et al. 2022, "An Image is Worth One Word").

New tokens get new rows in the token-embedding table of every text encoder of the engine; only
those rows learn. Everything else in the engine is frozen, the optimiser gets the embedding
tables, and ``after_step`` writes every other row back after each optimiser step, so weight
decay and momentum cannot move them (as diffusers' ``textual_inversion.py`` does). Lightning is
not needed: the trainer calls ``parameters()``, ``after_step()``, ``state_dict()`` and ``save()``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
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
from ldm.adapters.embeddings_file import write_embeddings
from ldm.adapters.embeddings_loader import file_parts, remove_everywhere

logger = logging.getLogger(__name__)

_SPEC_KEYS = {"vectors", "init"}


def _specs(tokens: Mapping[str, Mapping[str, Any] | None] | Sequence[str]) -> dict[str, dict]:
    """``{token: {"vectors": n, "init": text | None}}`` with defaults, checked."""
    if isinstance(tokens, str) or not isinstance(tokens, Mapping):
        tokens = {t: {} for t in ([tokens] if isinstance(tokens, str) else tokens)}
    if not tokens:
        raise ValueError("TextualInversion: no tokens to learn; pass e.g. {'<my-style>': {}}.")
    out = {}
    for token, spec in tokens.items():
        spec = dict(spec or {})
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if unknown:
            raise ValueError(
                f"TextualInversion: token '{token}': unknown key(s) {unknown}; expected "
                f"{sorted(_SPEC_KEYS)} (vectors: int >= 1, init: a word/phrase or None)."
            )
        n = spec.get("vectors", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"TextualInversion: token '{token}': vectors={n!r}, need an int >= 1.")
        init = spec.get("init")
        if init is not None and not isinstance(init, str):
            raise ValueError(
                f"TextualInversion: token '{token}': init={init!r}; expected a word or phrase "
                "(its token embeddings' mean starts the new vectors) or None (random normal)."
            )
        out[str(token)] = {"vectors": n, "init": init}
    return out


def initial_rows(
    enc: TextEncoder, token: str, n: int, init: str | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Start vectors [n, d]: the mean of ``init``'s token embeddings, or N(0, std of the table)."""
    weight = enc.embedding.weight.detach()
    if init is None:
        noise = torch.randn(n, weight.shape[1], generator=generator)
        return noise * weight.float().std().cpu()
    ids = enc.tokenizer.encode(init)
    if not ids:
        raise ValueError(
            f"TextualInversion: token '{token}': init={init!r} gives no tokens for {enc.name}; "
            "use a word such as 'painting' or init: null."
        )
    mean = weight[torch.tensor(ids, device=weight.device)].float().mean(dim=0)  # [d]
    return mean.cpu().expand(n, -1).clone()


class TextualInversion:
    """Learn new tokens' vectors in every text encoder of ``engine`` (the rest stays frozen)."""

    def __init__(
        self,
        engine: nn.Module,
        tokens: Mapping[str, Mapping[str, Any] | None] | Sequence[str],
        generator: torch.Generator | None = None,
    ) -> None:
        self.specs = _specs(tokens)
        self.encoders = text_encoders(engine)
        self.owner = new_owner()
        self._grad_flags = [(p, p.requires_grad) for p in engine.parameters()]
        self._table_flags = {e.name: e.embedding.weight.requires_grad for e in self.encoders}
        starts = {}
        for enc in self.encoders:  # the start vectors come from the table before any change
            starts[enc.name] = {
                t: initial_rows(enc, t, s["vectors"], s["init"], generator)
                for t, s in self.specs.items()
            }
        for token in self.specs:
            if remove_everywhere(self.encoders, token):
                logger.warning("TextualInversion: '%s' was already loaded; replacing it.", token)
        self.ids: dict[str, dict[str, list[int]]] = {t: {} for t in self.specs}
        self._frozen: dict[str, torch.Tensor] = {}  # the rows before the new ones, per encoder
        self._params: dict[str, nn.Parameter] = {}
        for enc in self.encoders:
            self._frozen[enc.name] = enc.embedding.weight.detach()  # replaced by the cat below
            for token, rows in starts[enc.name].items():
                self.ids[token][enc.name] = add_token_rows(enc.module, token, rows, self.owner)
        engine.requires_grad_(False)
        for enc in self.encoders:
            weight = enc.embedding.weight
            weight.requires_grad_(True)
            self._params[enc.name] = weight
        logger.info(
            "Textual inversion: learning %s in %s",
            ", ".join(f"'{t}' ({s['vectors']} vectors)" for t, s in self.specs.items()),
            "; ".join(e.describe() for e in self.encoders),
        )

    def parameters(self) -> list[nn.Parameter]:
        """The embedding tables to optimise (one per text encoder); nothing else requires grad."""
        return list(self._params.values())

    def _weight(self, enc: TextEncoder) -> nn.Parameter:
        weight = enc.embedding.weight
        if weight is not self._params[enc.name]:
            raise RuntimeError(
                f"TextualInversion: the token-embedding table of {enc.name} was replaced after "
                "training started (tokens added or removed, or the module rebuilt), so the "
                "optimiser no longer updates it. Load other embeddings before creating "
                "TextualInversion, and create the optimiser from its parameters()."
            )
        return weight

    @torch.no_grad()
    def after_step(self) -> None:
        """Write back every row except the new ones, exactly (call after ``optimizer.step()``)."""
        for enc in self.encoders:
            weight = self._weight(enc)
            frozen = self._frozen[enc.name]
            if frozen.device != weight.device or frozen.dtype != weight.dtype:
                frozen = self._frozen[enc.name] = frozen.to(weight)
            weight[: frozen.shape[0]] = frozen

    def learned(self) -> dict[str, dict[str, torch.Tensor]]:
        """The current vectors: token -> encoder name (clip_l / clip_g / text) -> [n, d]."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for token, per_encoder in self.ids.items():
            out[token] = {}
            for enc in self.encoders:
                ids = per_encoder[enc.name]
                out[token][enc.name] = self._weight(enc).detach()[ids[0] : ids[-1] + 1].clone()
        return out

    def save(
        self, path: str | os.PathLike, format: str = "a1111", step: int | None = None
    ) -> list[Path]:
        """Write the learned vectors as A1111 or diffusers files; returns the files written."""
        parts = {t: file_parts(v) for t, v in self.learned().items()}
        return write_embeddings(path, parts, format=format, step=step)

    def state_dict(self) -> dict[str, Any]:
        """The learned rows and the token settings, for resuming."""
        return {"tokens": {t: dict(s) for t, s in self.specs.items()}, "vectors": self.learned()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put learned rows back (same tokens, encoders and number of vectors)."""
        vectors = state.get("vectors") if isinstance(state, Mapping) else None
        if not isinstance(vectors, Mapping) or set(vectors) != set(self.ids):
            found = sorted(vectors) if isinstance(vectors, Mapping) else type(vectors).__name__
            raise ValueError(
                f"TextualInversion.load_state_dict: the state holds tokens {found}, this run "
                f"learns {sorted(self.ids)}. Resume with the same tokens."
            )
        with torch.no_grad():
            for token, per_encoder in vectors.items():
                for enc in self.encoders:
                    ids = self.ids[token][enc.name]
                    rows = per_encoder.get(enc.name)
                    if rows is None or tuple(rows.shape) != (len(ids), enc.width):
                        shape = None if rows is None else tuple(rows.shape)
                        raise ValueError(
                            f"TextualInversion.load_state_dict: '{token}' for {enc.name}: found "
                            f"{shape}, expected ({len(ids)}, {enc.width})."
                        )
                    self._weight(enc)[ids[0] : ids[-1] + 1] = rows.to(self._params[enc.name])

    def remove(self) -> None:
        """Take the tokens out again and restore every parameter's requires_grad."""
        for enc in self.encoders:
            mine = [t for t in self.ids if token_owner(enc.module, t) == self.owner]
            remove_token_rows(enc.module, mine)
            enc.embedding.weight.requires_grad_(self._table_flags[enc.name])
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._params = {}
