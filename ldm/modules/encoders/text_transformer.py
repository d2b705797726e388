"""``CLIPTextEncoder``: a trainable CLIP-architecture text encoder for training LDMs from scratch.

Same architecture as CLIP's text tower (Radford et al. 2021: causal pre-LN transformer over the
CLIP BPE, 77 positions), built from hyperparameters, random init, trained with the diffusion model
(``cond_stage_trainable: true``). Caption dropout with probability ``ucg_rate`` trains the null
condition "" for classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ldm.modules.encoders.base import AbstractEncoder
from ldm.modules.encoders.clip import build_clip_text_config, set_hf_checkpointing
from ldm.modules.encoders.long_prompt import DEFAULT_MAX_CHUNKS, LongPromptMixin
from ldm.modules.encoders.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, get_tokenizer


class CLIPTextEncoder(LongPromptMixin, AbstractEncoder):
    """Prompts -> ``[B, max_length, width]`` from a CLIP-style text transformer (key ``transformer.*``).

    Long prompts are encoded in chunks of ``max_length`` (``[B, max_length * n, width]``, at most
    ``max_chunks``; gradients flow through every chunk) and ``emphasis`` parses ``(word:1.3)``
    weights (``ldm.modules.encoders.long_prompt``).
    """

    def __init__(
        self,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        vocab_size: int = VOCAB_SIZE,
        max_length: int = CONTEXT_LENGTH,
        act: str = "quick_gelu",
        dropout: float = 0.0,
        ucg_rate: float = 0.0,
        tokenizer: str = "sd-v1",
        gradient_checkpointing: bool = False,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        emphasis: bool = True,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"CLIPTextEncoder: width={width} must be divisible by heads={heads}.")
        if not 0.0 <= float(ucg_rate) <= 1.0:
            raise ValueError(f"CLIPTextEncoder: ucg_rate must be in [0, 1], got {ucg_rate}.")
        from transformers import CLIPTextModel

        config = build_clip_text_config(
            {
                "hidden_size": width,
                "intermediate_size": int(width * mlp_ratio),
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "vocab_size": vocab_size,
                "max_position_embeddings": max_length,
                "hidden_act": act,
                "dropout": dropout,
                "attention_dropout": dropout,
                "projection_dim": width,
            }
        )
        self.transformer = CLIPTextModel(config)
        if gradient_checkpointing:
            self.set_grad_checkpointing(True)
        self.max_length = int(max_length)
        self.ucg_rate = float(ucg_rate)
        self.tokenizer = get_tokenizer(tokenizer, self.max_length)
        self.init_long_prompts(max_chunks, emphasis)

    def drop_captions(
        self, text: Sequence[str], generator: torch.Generator | None = None
    ) -> list[str]:
        """Replace each caption by "" with probability ``ucg_rate`` (training only)."""
        text = list(text)
        if not self.training or self.ucg_rate <= 0.0:
            return text
        u = torch.rand(len(text), generator=generator)
        return ["" if float(ui) < self.ucg_rate else t for t, ui in zip(text, u)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the transformer layers' activations in backward (when training)."""
        set_hf_checkpointing(self.transformer, enable)

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, max_length]`` (truncated; ``tokenize_chunks`` gives the chunks
        ``forward`` encodes)."""
        return self.tokenizer(text, max_length=self.max_length)["input_ids"]

    def forward(
        self, text: str | Sequence[str] | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Last hidden states ``[B, max_length * n_chunks, width]`` (captions dropped first when
        training)."""
        if not isinstance(text, torch.Tensor):
            text = self.drop_captions([text] if isinstance(text, str) else text, generator)
        device = self.transformer.embeddings.token_embedding.weight.device
        return self.encode_prompts(text, self._encode_ids, device)

    def _encode_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[M, L, width]`` of token ids ``[M, L]``."""
        return self.transformer(input_ids=tokens).last_hidden_state

    def get_unconditional_conditioning(self, batch_size: int, device: Any = None) -> list[str]:
        """The null condition as input: ``batch_size`` empty prompts."""
        return [""] * batch_size
