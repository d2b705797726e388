"""How conditioning reaches the network (CompVis `conditioning_key` routing).

`DiffusionWrapper` holds the U-Net as `diffusion_model` (so state-dict keys read
`model.diffusion_model.*` as in SD files) and routes conditioning by `conditioning_key`
(Rombach et al. 2022, Sec. 3.3: concatenation for spatially aligned inputs, cross-attention for
sequences, `adm` for class / vector conditioning through the U-Net's `y`).

Caption dropout for classifier-free guidance lives in the Conditioner (`ldm.engine.conditioner`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.util import instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


class DiffusionWrapper(nn.Module):
    """eps_theta(x_t, t, c): concatenate `c_concat` to x, pass `c_crossattn` as context, `c_adm` as y."""

    def __init__(self, diff_model_config: Any, conditioning_key: str | None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(
                f"conditioning_key={conditioning_key!r} is not supported; expected one of "
                f"{list(CONDITIONING_KEYS)}."
            )
        self.sequential_cross_attn = False
        if isinstance(diff_model_config, Mapping) or hasattr(diff_model_config, "keys"):
            params = diff_model_config.get("params") or {}
            if "sequential_crossattn" in params:
                # CompVis reads and removes this flag before building the U-Net
                self.sequential_cross_attn = bool(params["sequential_crossattn"])
                params = {k: v for k, v in params.items() if k != "sequential_crossattn"}
                diff_model_config = {"target": diff_model_config["target"], "params": params}
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
        c_adm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, C, H, W], t: [B]; c_concat: list of [B, C_i, H, W]; c_crossattn: list of [B, M, D]."""
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key in ("concat", "hybrid", "hybrid-adm"):
            _require(c_concat, "c_concat", key)
            x = torch.cat([x, *c_concat], dim=1)  # [B, C + sum C_i, H, W]
        if key == "concat":
            return self.diffusion_model(x, t)
        if key == "adm":
            _require(c_crossattn, "c_crossattn", key)
            return self.diffusion_model(x, t, y=c_crossattn[0])
        _require(c_crossattn, "c_crossattn", key)
        if self.sequential_cross_attn:
            context: Any = list(c_crossattn)
        else:
            context = torch.cat(list(c_crossattn), dim=1)  # [B, sum M_i, D]
        if key in ("crossattn", "hybrid"):
            return self.diffusion_model(x, t, context=context)
        if c_adm is None:
            raise ValueError(f"conditioning_key '{key}' needs c_adm (the vector passed as y).")
        return self.diffusion_model(x, t, context=context, y=c_adm)


def _require(value: Any, name: str, key: str) -> None:
    if value is None or (isinstance(value, list | tuple) and any(v is None for v in value)):
        raise ValueError(
            f"conditioning_key '{key}' needs {name} (a list of tensors); got {value!r}. Pass the "
            f"condition as a dict {{'{name}': [tensor]}} or a tensor to apply_model."
        )


def as_cond_dict(cond: Any, conditioning_key: str | None) -> dict[str, Any]:
    """A condition as the wrapper's keyword dict: tensors/lists go to c_concat or c_crossattn."""
    if isinstance(cond, Mapping):
        return dict(cond)
    if not isinstance(cond, list):
        cond = [cond]
    key = "c_concat" if conditioning_key == "concat" else "c_crossattn"
    return {key: cond}
