"""Exponential moving average of model weights with Stable Diffusion's state-dict names.

Polyak & Juditsky 1992 averaging as used by DDPM (Ho et al. 2020, Appendix B) and LDM. Buffers
match CompVis `ldm.modules.ema.LitEma`: `decay`, `num_updates`, and one shadow buffer per trainable
parameter named after the parameter with every dot removed
(`diffusion_model.input_blocks.0.0.weight` -> `diffusion_modelinput_blocks00weight`), so a
LatentDiffusion holding `model_ema = LitEma(self.model)` writes `model_ema.*` keys as SD files do.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["LitEma", "shadow_name"]


def shadow_name(param_name: str) -> str:
    """EMA buffer name of a parameter: the name with every '.' removed (CompVis convention)."""
    return param_name.replace(".", "")


class LitEma(nn.Module):
    """Shadow copy theta_ema <- theta_ema - (1 - d) (theta_ema - theta) after every optimizer step.

    With `use_num_updates` the effective decay is min(decay, (1 + n) / (10 + n)) (TF's
    ExponentialMovingAverage warm-up), n = number of updates so far.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma: decay must be in [0, 1], got {decay}.")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        start = 0 if use_num_upates else -1
        self.register_buffer("num_updates", torch.tensor(start, dtype=torch.int))
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s_name = shadow_name(name)
            if s_name in self.m_name2s_name.values():
                raise ValueError(
                    f"LitEma: parameters '{name}' and another one map to the same shadow name "
                    f"'{s_name}' once dots are removed; rename one of them."
                )
            self.m_name2s_name[name] = s_name
            self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def reset_num_updates(self) -> None:
        """Restart the decay warm-up (CompVis `reset_num_ema_updates`)."""
        self.num_updates = torch.tensor(0, dtype=torch.int, device=self.num_updates.device)

    def current_decay(self) -> float:
        """Decay used by the next update (after incrementing num_updates when counting)."""
        decay = float(self.decay)
        n = int(self.num_updates)
        if n >= 0:
            n += 1
            decay = min(decay, (1 + n) / (10 + n))
        return decay

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from the model's current parameters."""
        decay = self.current_decay()
        if int(self.num_updates) >= 0:
            self.num_updates += 1
        one_minus_decay = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            s_name = self.m_name2s_name.get(name)
            if s_name is None:
                raise KeyError(
                    f"LitEma: parameter '{name}' has no shadow copy; the EMA was built for a "
                    "model with a different set of trainable parameters."
                )
            buf = shadow[s_name]
            if buf.dtype != param.dtype:
                buf.data = buf.data.to(param.dtype)
            buf.sub_(one_minus_decay * (buf - param.detach()))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into the model's trainable parameters."""
        shadow = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data.copy_(shadow[self.m_name2s_name[name]].data)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save the current parameters so that `restore` can bring them back."""
        self.collected_params = [p.detach().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by `store` (after validating with EMA weights)."""
        if not self.collected_params:
            raise RuntimeError("LitEma.restore called without a preceding store().")
        for saved, param in zip(self.collected_params, parameters, strict=True):
            param.data.copy_(saved.data)
        self.collected_params = []
