"""Adapter runs' checkpoints: only the adapter's weights are saved; the base comes from ckpt_path.

``adapter_only`` prunes a Lightning checkpoint's state dict to the adapter's keys and their EMA;
``fill_base`` puts the (frozen) base weights the engine was built with back before Lightning loads
the checkpoint strictly, so a resume checks every adapter key. ``export_adapter`` writes the
shareable file(s) into ``<run>/adapters/`` from the EMA weights when the run keeps an EMA.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapters"


def _ema_keys(engine: nn.Module) -> set[str]:
    ema = getattr(engine, "model_ema", None) if getattr(engine, "use_ema", False) else None
    return {"model_ema." + k for k, _ in ema.named_buffers()} if ema is not None else set()


def adapter_only(engine: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``state_dict`` an adapter run saves: adapter weights and the EMA's buffers."""
    keep = _ema_keys(engine)
    out = {k: v for k, v in state_dict.items() if engine.adapter.owns(k) or k in keep}
    logger.debug("Adapter checkpoint: %d of %d entries kept.", len(out), len(state_dict))
    return out


def fill_base(engine: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Complete an adapter-only checkpoint with the engine's own (base) weights, in place."""
    state = checkpoint["state_dict"]
    own = engine.state_dict()
    adapter = engine.adapter
    missing = [k for k in own if adapter is not None and adapter.owns(k) and k not in state]
    if adapter is None or missing:
        what = (
            "no adapter is configured"
            if adapter is None
            else f"it lacks {len(missing)} adapter weight(s), e.g. {missing[:3]}"
        )
        raise ValueError(
            f"This checkpoint holds only the weights of an adapter ({checkpoint.get('adapter')}), "
            f"but {what}. Resume it with the run's own config (its model.params.adapter and the "
            "base ckpt_path), or sample the base model with the exported adapter file "
            "(--lora / --embedding)."
        )
    for key, value in own.items():
        state.setdefault(key, value)


def export_adapter(engine: nn.Module) -> list[Path]:
    """Write the adapter's file(s) into ``<run>/adapters/`` (EMA weights when kept); rank 0 only."""
    trainer = getattr(engine, "_trainer", None)
    if trainer is None or not trainer.is_global_zero:
        return []
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        directory = Path(callback.dirpath).parent / ADAPTER_DIR
    else:
        directory = Path(trainer.default_root_dir) / ADAPTER_DIR
    with engine.ema_scope():
        written = engine.adapter.export(directory)
    for path in written:
        logger.info("Adapter written: %s", path)
    return written
