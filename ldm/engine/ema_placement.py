"""Where and how often the engine's EMA is updated: ``ema_device`` and ``ema_every``.

- ``ema_device: cpu`` keeps the shadow weights in host memory (saves one copy of the trained
  weights on the accelerator, costs a device-to-host copy per update); null keeps them with the
  model (CompVis).
- ``ema_every: N`` updates every N optimizer steps with decay**N (same averaging horizon, N times
  fewer updates; ``ldm.ema.LitEma``).

The state-dict keys (``model_ema.*``) are the same either way, so checkpoints load across settings.
"""

from __future__ import annotations

from typing import Any

from ldm.util import ConfigError

__all__ = ["ema_options", "ignore_pinned_ema_in_ddp"]

EMA_DEVICES = ("cpu",)


def ema_options(ema_device: Any, ema_every: Any) -> dict[str, Any]:
    """LitEma keyword arguments (device, every) from the engine parameters, checked."""
    if ema_device is not None and ema_device not in EMA_DEVICES:
        raise ConfigError(
            f"ema_device={ema_device!r}: expected 'cpu' (the EMA in host memory) or null (with the "
            "model)."
        )
    if isinstance(ema_every, bool) or not isinstance(ema_every, int) or ema_every < 1:
        raise ConfigError(
            f"ema_every={ema_every!r}: expected a positive integer (update the EMA every N "
            "optimizer steps with decay**N); 1 updates after every step."
        )
    return {"device": ema_device, "every": ema_every}


def ignore_pinned_ema_in_ddp(engine: Any) -> None:
    """DDP broadcasts buffers from rank 0 (NCCL: device tensors only); an EMA in host memory is
    computed identically on every rank, so DDP leaves it out."""
    if engine.use_ema and engine.model_ema.pinned_device is not None:
        engine._ddp_params_and_buffers_to_ignore = [
            f"model_ema.{name}" for name, _ in engine.model_ema.named_buffers()
        ]
