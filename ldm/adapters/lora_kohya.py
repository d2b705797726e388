"""kohya (sd-scripts `networks/lora.py`) LoRA state dicts: `<name>.lora_down.weight`,
`<name>.lora_up.weight` and `<name>.alpha` (a scalar; missing means alpha = rank)."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.adapters.lora_weights import LoraError, LoraModule

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"


def read_kohya(sd: dict[str, Tensor], source: str) -> dict[str, LoraModule]:
    """kohya module name -> LoraModule (names as in the file)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        name, _, what = key.partition(".")
        if what not in (DOWN, UP, ALPHA):
            raise LoraError(
                f"{source}: key `{key}` is not a kohya LoRA entry (expected `<name>.{DOWN}`, "
                f"`<name>.{UP}` or `<name>.{ALPHA}`). Remove it or convert the file."
            )
        parts.setdefault(name, {})[what] = value
    out = {}
    for name, p in parts.items():
        if DOWN not in p or UP not in p:
            missing = DOWN if DOWN not in p else UP
            raise LoraError(
                f"{source}: module `{name}` has no `{missing}`; the file is incomplete."
            )
        alpha = float(p[ALPHA].float().item()) if ALPHA in p else None
        out[name] = LoraModule(p[DOWN], p[UP], alpha)
    return out


def write_kohya(named: dict[str, LoraModule]) -> dict[str, Tensor]:
    """kohya state dict of named modules (alpha always written, as sd-scripts does)."""
    sd: dict[str, Tensor] = {}
    for name, m in named.items():
        sd[f"{name}.{DOWN}"] = m.down.contiguous()
        sd[f"{name}.{UP}"] = m.up.contiguous()
        alpha = m.rank if m.alpha is None else m.alpha
        sd[f"{name}.{ALPHA}"] = torch.tensor(float(alpha), dtype=torch.float32)
    return sd
