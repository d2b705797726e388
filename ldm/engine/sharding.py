"""FSDP2 for fine-tuning (``lightning.trainer.strategy: fsdp2``): Lightning's
``ModelParallelStrategy`` with ``torch.distributed.fsdp.fully_shard`` applied here.

- Wrap policy: each U-Net block (``input_blocks.i``, ``middle_block``, ``output_blocks.i``) is
  its own FSDP unit, the U-Net root holds the rest (time embedding, ``out``); a text encoder
  that trains is sharded as one unit more. Each unit's weights are gathered just for its
  forward / backward, so the peak holds one block's full weights, not the model's.
- Frozen parts (the autoencoder, a frozen text encoder) are not sharded and never reach the
  optimizer: they stay whole on every rank (they run under no_grad outside the U-Net).
- The EMA is sharded like the weights it follows (each rank updates its shard), and is gathered
  with them into the consolidated checkpoint.
- Checkpoints are one full state dict written by rank 0 (``save_distributed_checkpoint=False``),
  which ``ldm.load_model`` reads like any other; a run resumes from it on any number of ranks.
Runs on CPU with gloo (tested with two processes) and on GPUs with NCCL.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

STRATEGY_NAMES = ("fsdp2", "model_parallel")


def fsdp2_strategy(devices: Any = 1, num_nodes: Any = 1) -> Any:
    """Lightning's FSDP2 strategy over all ranks (data parallel only), consolidating checkpoints
    into one file."""
    from pytorch_lightning.strategies import ModelParallelStrategy

    if isinstance(devices, list | tuple):
        per_node = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        per_node = int(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool):
        per_node = devices
    else:
        from ldm.util import ConfigError

        raise ConfigError(
            f"strategy fsdp2: give lightning.trainer.devices as a number, found {devices!r}."
        )
    return ModelParallelStrategy(
        data_parallel_size=per_node * int(num_nodes or 1),
        tensor_parallel_size=1,
        save_distributed_checkpoint=False,
    )


def uses_fsdp2(engine: nn.Module) -> bool:
    trainer = getattr(engine, "_trainer", None)
    if trainer is None:
        return False
    from pytorch_lightning.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def _units(unet: nn.Module) -> list[nn.Module]:
    blocks = [*getattr(unet, "input_blocks", []), getattr(unet, "middle_block", None)]
    blocks += [*getattr(unet, "output_blocks", [])]
    return [b for b in blocks if isinstance(b, nn.Module) and any(True for _ in b.parameters())]


def shard_engine(engine: nn.Module) -> None:
    """Apply fully_shard to the U-Net's blocks, the U-Net, a training text encoder; shard the
    EMA like its parameters. Idempotent (Lightning calls configure_model for every stage)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    unet = engine.model.diffusion_model
    if isinstance(unet, FSDPModule):
        return
    if getattr(engine, "learn_logvar", False):
        from ldm.util import ConfigError

        raise ConfigError("strategy fsdp2: learn_logvar is not supported (an unsharded parameter).")
    mesh = engine.trainer.strategy.device_mesh["data_parallel"]
    units = _units(unet)
    for block in units:
        fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    text = _training_text_encoder(engine)
    if text is not None:
        fully_shard(text, mesh=mesh)
    if getattr(engine, "use_ema", False):
        shard_ema_like(engine.model_ema, engine.model)
    logger.info(
        "fsdp2: %d U-Net blocks + the U-Net root sharded over %d ranks%s; frozen parts whole",
        len(units),
        mesh.size(),
        " + the text encoder" if text is not None else "",
    )


def _training_text_encoder(engine: nn.Module) -> nn.Module | None:
    module = getattr(engine, "cond_stage_model", None)
    if isinstance(module, nn.Module) and any(p.requires_grad for p in module.parameters()):
        return module
    return None


@torch.no_grad()
def shard_ema_like(ema: nn.Module, model: nn.Module) -> None:
    """Each EMA shadow buffer becomes a DTensor with the placement of the parameter it follows."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        s_name = ema.m_name2s_name.get(name)
        if s_name is None or not isinstance(param, DTensor):
            continue
        buf = ema._buffers[s_name]
        if isinstance(buf, DTensor):
            continue
        ema._buffers[s_name] = distribute_tensor(
            buf.to(param.device), param.device_mesh, param.placements
        )
