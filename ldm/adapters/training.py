"""The ``adapter`` section of a model config: which adapter trains, with everything else frozen.

    adapter:
      type: lora               # lora | textual_inversion
      rank: 8                  # lora: see ldm.adapters.peft_lora.LoraTrainingConfig
      ...
      tokens: {"<purple>": {init: blue}}   # textual_inversion: see ldm.adapters.textual_inversion

An adapter object gives the engine its ``trainable_parameters()``, ``after_step()`` (after each
optimizer step), ``owns(key)`` (the state-dict keys an adapter-only checkpoint keeps) and
``export(directory)`` (the files people share).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import nn

from ldm.util import ConfigError

ADAPTER_TYPES = ("lora", "textual_inversion")


class Adapter(Protocol):
    kind: str

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def after_step(self) -> None: ...

    def owns(self, key: str) -> bool: ...

    def export(self, directory: Any) -> list[Any]: ...


def build_adapter(engine: nn.Module, config: Mapping[str, Any]) -> Adapter:
    """The adapter of ``config['type']`` set up on ``engine`` (freezes everything else)."""
    kind = config.get("type")
    if kind == "lora":
        from ldm.adapters.peft_lora import LoraTraining

        return LoraTraining(engine, config)
    if kind == "textual_inversion":
        from ldm.adapters.ti_training import TextualInversionTraining

        return TextualInversionTraining(engine, config)
    raise ConfigError(
        f"model.params.adapter.type={kind!r}: expected one of {list(ADAPTER_TYPES)}. "
        "(DreamBooth trains the whole model or a LoRA: use data ldm.data.dreambooth.DreamBoothDataset "
        "with or without an adapter.)"
    )
