"""Textual inversion as an engine adapter (Gal et al. 2022): only the new tokens' rows train.

    adapter:
      type: textual_inversion
      tokens:
        purple-ti: {init: blue, vectors: 1}    # init: a word whose embedding starts the rows
      name: purple-ti                          # file name (default: the token)
      save_format: a1111                       # a1111 (.pt) | a1111-safetensors | diffusers

The tokens are added to every text encoder of the model (both of SDXL's); the rest of the model
is frozen and ``after_step`` restores every other row of the embedding tables, so weight decay
and momentum cannot move them. ``export`` writes the learned vectors in the chosen format.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

FORMATS = {"a1111": ".pt", "a1111-safetensors": ".safetensors", "diffusers": ".safetensors"}
KEYS = ("type", "tokens", "name", "save_format", "base_weights")


class TextualInversionTraining:
    """New tokens' embedding rows as the only trainable weights of an engine."""

    kind = "textual_inversion"

    def __init__(self, engine: nn.Module, config: Mapping[str, Any]) -> None:
        from ldm.adapters.textual_inversion import TextualInversion

        unknown = sorted(set(config) - set(KEYS))
        if unknown:
            raise ConfigError(
                f"adapter (type textual_inversion): unknown key(s) {unknown}; known: {list(KEYS)}."
            )
        tokens = dict(config.get("tokens") or {})
        if not tokens:
            raise ConfigError(
                'adapter (type textual_inversion) needs tokens, e.g. tokens: {"<purple>": '
                "{init: blue, vectors: 1}}."
            )
        self.format = str(config.get("save_format", "a1111"))
        if self.format not in FORMATS:
            raise ConfigError(
                f"adapter.save_format={self.format!r}: expected one of {list(FORMATS)}."
            )
        first = next(iter(tokens))
        self.name = str(config.get("name") or re.sub(r"[^\w.-]+", "", first) or "embedding")
        if self.format.startswith("a1111") and (len(tokens) > 1 or self.name != first):
            logger.warning(
                "A1111 names an embedding after its file: %s%s will be used in prompts as '%s' "
                "(the trained token is %s).",
                self.name,
                FORMATS[self.format],
                self.name,
                list(tokens),
            )
        spec = {t: dict(v or {}) for t, v in tokens.items()}
        self.ti = TextualInversion(engine, spec)
        params = {id(p) for p in self.ti.parameters()}
        self.keys = {n for n, p in engine.named_parameters() if id(p) in params}
        logger.info(
            "Textual inversion: tokens %s in %d embedding table(s).", list(spec), len(params)
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.ti.parameters())

    def after_step(self) -> None:
        self.ti.after_step()

    def owns(self, key: str) -> bool:
        return key in self.keys

    def export(self, directory: Any) -> list[Path]:
        path = Path(directory) / f"{self.name}{FORMATS[self.format]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "diffusers" if self.format == "diffusers" else "a1111"
        self.ti.save(path, format=fmt)
        return [path]
