"""Exponential moving average of model weights with Stable Diffusion's state-dict names.

Polyak & Juditsky 1992 averaging as used by DDPM (Ho et al. 2020, Appendix B) and LDM. Buffers
match CompVis `ldm.modules.ema.LitEma`: `decay`, `num_updates`, and one shadow buffer per trainable
parameter named after the parameter with every dot removed
(`diffusion_model.input_blocks.0.0.weight` -> `diffusion_modelinput_blocks00weight`), so a
LatentDiffusion holding `model_ema = LitEma(self.model)` writes `model_ema.*` keys as SD files do.

Two memory options leave those names alone:

- ``device="cpu"``: the shadow (and ``store``'s copies) live in host memory whatever device the
  model moves to (``model.to(...)``, ``.half()`` leave this module as it is); each update copies
  the parameters to the host. A checkpoint written this way loads into an EMA on the model's device
  and back (same keys; ``load_state_dict`` copies across devices).
- ``every=N``: ``after_step`` updates once every N optimizer steps with the decay raised to the
  N-th power, d_N = d**N, so the averaging horizon 1 / (1 - d) in steps stays the same;
  ``num_updates`` then counts optimizer steps (it grows by N per update), so the warm-up
  min(d, (1 + n) / (10 + n)) runs over the same steps as with N = 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
        self,
        model: nn.Module,
        decay: float = 0.9999,
        use_num_upates: bool = True,
        device: str | torch.device | None = None,
        every: int = 1,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma: decay must be in [0, 1], got {decay}.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"LitEma: every must be a positive integer, got {every!r}.")
        #: where the shadow stays (None: it follows the model, as CompVis's)
        self.pinned_device = torch.device(device) if device is not None else None
        self.every = every
        self._steps_seen = 0  # optimizer steps counted here when no step number is given
        self._last_update_step: int | None = None
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
            self.register_buffer(s_name, self._copy(p))
        if self.pinned_device is not None and self.decay.device.type != "meta":
            self.decay = self.decay.to(self.pinned_device)
            self.num_updates = self.num_updates.to(self.pinned_device)
        self.collected_params: list[torch.Tensor] = []

    def _copy(self, p: torch.Tensor) -> torch.Tensor:
        """A detached copy of ``p`` where this EMA keeps its tensors."""
        if self.pinned_device is None or p.device.type == "meta":  # a meta model stays meta
            return p.detach().clone()
        return p.detach().to(self.pinned_device, copy=True)

    def _apply(self, fn: Any, recurse: bool = True) -> LitEma:
        """With a pinned device, moves and casts of the model (``.to``, ``.cuda``, ``.half``)
        leave the shadow where and as it is."""
        if self.pinned_device is None:
            return super()._apply(fn, recurse)
        return self

    def drop_untrained(self, model: nn.Module) -> list[str]:
        """Forget the shadows of parameters that no longer train (frozen after this EMA was
        built); returns their parameter names."""
        dropped = [
            name
            for name, p in model.named_parameters()
            if not p.requires_grad and name in self.m_name2s_name
        ]
        for name in dropped:
            delattr(self, self.m_name2s_name.pop(name))
        return dropped

    def reset_num_updates(self) -> None:
        """Restart the decay warm-up (CompVis `reset_num_ema_updates`)."""
        self.num_updates = torch.tensor(0, dtype=torch.int, device=self.num_updates.device)

    def current_decay(self, steps: int = 1) -> float:
        """Decay of the next update covering ``steps`` optimizer steps: the one-step decay (with
        its warm-up after incrementing num_updates by ``steps`` when counting) to the power
        ``steps``."""
        decay = float(self.decay)
        n = int(self.num_updates)
        if n >= 0:
            n += steps
            decay = min(decay, (1 + n) / (10 + n))
        return decay**steps

    def after_step(self, model: nn.Module, step: int | None = None) -> bool:
        """Call after every optimizer step; updates when the step number is a multiple of
        ``every`` (each call with every=1, as CompVis). ``step``: the trainer's global step (so a
        resumed run keeps the phase); None counts the calls here. Returns whether it updated."""
        if step is None:
            self._steps_seen += 1
            step = self._steps_seen
        if self.every == 1:
            self(model)
            return True
        if step % self.every or step == self._last_update_step:
            return False
        self._last_update_step = step
        self(model, steps=self.every)
        return True

    @torch.no_grad()
    def forward(self, model: nn.Module, steps: int = 1) -> None:
        """One EMA update from the model's current parameters, standing for ``steps`` optimizer
        steps (decay ** steps)."""
        decay = self.current_decay(steps)
        if int(self.num_updates) >= 0:
            self.num_updates += steps
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
            if self.pinned_device is not None:  # the shadow keeps its device and dtype
                buf.sub_(one_minus_decay * (buf - param.detach().to(buf.device, buf.dtype)))
                continue
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
        """Save the current parameters (where the shadow lives) so that `restore` can bring them
        back."""
        self.collected_params = [self._copy(p) for p in parameters]

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by `store` (after validating with EMA weights)."""
        if not self.collected_params:
            raise RuntimeError("LitEma.restore called without a preceding store().")
        for saved, param in zip(self.collected_params, parameters, strict=True):
            param.data.copy_(saved.data)
        self.collected_params = []
