"""Checkpoint file kinds by suffix, and the error for a file that is not one we can read
(shared by the safe loader and the integrity checks)."""

from __future__ import annotations

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
#: every suffix the checkpoint loaders read
CHECKPOINT_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)


class CheckpointFormatError(ValueError):
    """The file is not a checkpoint we can read (unknown suffix, no state dict inside);
    ``keys``: the top-level keys of a pickled dict that held no state dict, for callers that
    tell what the file is instead (an embedding given as a LoRA)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys
