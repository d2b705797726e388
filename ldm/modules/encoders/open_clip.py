"""``FrozenOpenCLIPEmbedder``: the OpenCLIP ViT-H/14 text tower of Stable Diffusion 2.x.

Holds open_clip's ``CLIP`` model with the visual tower deleted as ``self.model``, so checkpoint keys
read ``cond_stage_model.model.*``. It is built from open_clip's shipped architecture config without
downloading; weights come from a checkpoint, a local file, or (only when asked) open_clip's hub.
SD 2.x uses ``layer="penultimate"``: the states after all but the last residual block, then
``ln_final`` (Stability-AI/stablediffusion ``FrozenOpenCLIPEmbedder``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.encoders.base import (
    AbstractEncoder,
    FrozenWeightsMixin,
    load_weights_file,
    strip_prefixes,
)
from ldm.modules.encoders.long_prompt import DEFAULT_MAX_CHUNKS, LongPromptMixin
from ldm.modules.encoders.open_clip_blocks import run_block
from ldm.modules.encoders.tokenizer import CONTEXT_LENGTH, end_token_positions, get_tokenizer
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

# The visual tower is deleted right after construction; build a minimal one instead of ViT-H's
# 632M parameters (the text tower and its keys do not depend on it).
_TINY_VISION = {"image_size": 14, "patch_size": 14, "layers": 1, "width": 64, "head_width": 64}


def build_text_only_clip(arch: str | dict[str, Any]) -> nn.Module:
    """open_clip ``CLIP`` for ``arch`` (name or model config) with random weights, no visual tower."""
    import open_clip

    if isinstance(arch, str):
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ConfigError(
                f"FrozenOpenCLIPEmbedder: unknown arch '{arch}'. open_clip knows e.g. "
                f"{[m for m in open_clip.list_models() if m.startswith('ViT-')][:12]} ..."
            )
    else:
        cfg = dict(arch)
    cfg = copy.deepcopy(cfg)
    text_cfg = dict(cfg.get("text_cfg", {}))
    if text_cfg.get("hf_model_name") or cfg.get("custom_text") or "multimodal_cfg" in cfg:
        raise ConfigError(
            f"FrozenOpenCLIPEmbedder: arch {arch!r} has a Hugging Face / custom text tower; only "
            "open_clip's own CLIP text transformer (as in SD 2.x) is supported."
        )
    cfg["vision_cfg"] = dict(_TINY_VISION)
    cfg.pop("custom_text", None)
    model = open_clip.CLIP(**cfg)
    del model.visual
    return model


class FrozenOpenCLIPEmbedder(LongPromptMixin, FrozenWeightsMixin, AbstractEncoder):
    """OpenCLIP text encoder (Cherti et al. 2023) giving SD 2.x's context ``[B, 77, 1024]``.

    Long prompts are encoded in chunks of 77 (``[B, 77 * n, D]``, at most ``max_chunks``, padded
    with 0 as ``open_clip.tokenize`` pads) and ``emphasis`` parses ``(word:1.3)`` weights
    (``ldm.modules.encoders.long_prompt``).
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str | dict[str, Any] = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str | torch.device | None = None,
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        weights: str | None = None,
        from_hub: bool = False,
        allow_random_weights: bool = False,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        emphasis: bool = True,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ConfigError(
                f"FrozenOpenCLIPEmbedder: layer='{layer}' is not one of {list(self.LAYERS)}."
            )
        self.arch, self.version = arch, version
        self.device_hint = device  # tokens follow the parameters' device; kept for compatibility
        self.max_length = int(max_length)
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]  # blocks skipped at the end
        self.tokenizer = get_tokenizer("sd-v2", self.max_length)
        self.init_long_prompts(max_chunks, emphasis)
        if from_hub:
            import open_clip

            logger.info("FrozenOpenCLIPEmbedder: loading %s/%s through open_clip", arch, version)
            try:
                model = open_clip.create_model(arch, pretrained=version, device="cpu")
            except (OSError, RuntimeError, ValueError) as err:
                raise FileNotFoundError(
                    f"FrozenOpenCLIPEmbedder: from_hub=True but {arch}/{version} could not be "
                    f"loaded ({type(err).__name__}: {err}). Pass a local checkpoint file as "
                    "version=... or weights=..., or leave from_hub off and load the weights from "
                    "a Stable Diffusion 2.x checkpoint."
                ) from err
            del model.visual
            self.model = model
        else:
            self.model = build_text_only_clip(arch)
        # logit_scale / text_projection serve CLIP's contrastive head, never the conditioning
        optional = {"logit_scale", "logit_bias", "text_projection"}
        self._setup_guard(self.model, freeze, allow_random_weights, optional_keys=optional)
        self.weights_loaded = from_hub
        if weights is None and not from_hub and os.path.isfile(str(version)):
            weights = str(version)  # open_clip accepts a checkpoint path as `pretrained`
        if weights is not None:
            self.load_weights(weights)
        elif not from_hub:
            logger.info(
                "FrozenOpenCLIPEmbedder: built %s with random weights (tag '%s' is not downloaded); "
                "load a checkpoint that contains cond_stage_model.model.*",
                arch,
                version,
            )

    # ------------------------------------------------------------------ weights
    def load_weights(self, path: str) -> None:
        """Load text-tower weights from an open_clip or SD checkpoint file (visual keys ignored)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"FrozenOpenCLIPEmbedder: weights '{path}' is not a file. Pass an open_clip "
                "checkpoint (.bin/.pt/.safetensors) or an SD 2.x checkpoint."
            )
        sd = strip_prefixes(
            load_weights_file(path), ("cond_stage_model.model.", "module.", "model.")
        )
        own = set(self.model.state_dict(keep_vars=True))
        sd = {"model." + k: v for k, v in sd.items() if k in own}
        self.load_state_dict(sd, strict=False)
        if not self.weights_loaded:
            raise ValueError(
                f"FrozenOpenCLIPEmbedder: '{path}' lacks text-tower weights of {self.arch}: "
                f"missing {sorted(own - {k[len('model.') :] for k in sd})[:8]} ..."
            )

    def _describe(self) -> str:
        return f"OpenCLIP text encoder {self.arch}/{self.version}"

    def _weights_hint(self) -> str:
        return "weights=<open_clip or SD 2.x checkpoint file>, or version=<local checkpoint file>"

    # ------------------------------------------------------------------ encoding
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the residual blocks' activations in backward (open_clip's switch on the
        text transformer; ``CLIP.set_grad_checkpointing`` would reach for the deleted visual)."""
        self.model.transformer.grad_checkpointing = enable

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, max_length]`` as ``open_clip.tokenize`` gives them (padded with 0,
        truncated; ``tokenize_chunks`` gives the chunks ``forward`` encodes)."""
        return self.tokenizer.tokenize(text, self.max_length)

    def forward(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Context ``[B, 77 * n_chunks, width]`` for prompts or token ids."""
        self.check_weights_loaded()
        return self.encode_prompts(text, self.encode_with_transformer, self._module_device())

    def embed_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(token embedding + positions in the transformer's layout, causal mask, batch_first)."""
        x = self.model.token_embedding(tokens)  # [B, L, D]
        x = x + self.model.positional_embedding[: x.shape[1]]
        batch_first = getattr(self.model.transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)  # [B, L, D] -> [L, B, D] for sequence-first open_clip
        attn_mask = getattr(self.model, "attn_mask", None)
        if attn_mask is not None:
            attn_mask = attn_mask[: tokens.shape[1], : tokens.shape[1]]
        return x, attn_mask, batch_first

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding + positions, residual blocks (all or all but the last), ``ln_final``."""
        x, attn_mask, batch_first = self.embed_tokens(tokens)
        x = self.text_transformer_forward(x, attn_mask=attn_mask)
        if not batch_first:
            x = x.permute(1, 0, 2)  # [L, B, D] -> [B, L, D]
        return self.model.ln_final(x)

    def text_transformer_forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the residual blocks, stopping ``layer_idx`` blocks before the end."""
        blocks = self.model.transformer.resblocks
        use_ckpt = (
            getattr(self.model.transformer, "grad_checkpointing", False) and torch.is_grad_enabled()
        )
        for block in blocks[: len(blocks) - self.layer_idx]:
            if use_ckpt:
                x = checkpoint(run_block, block, x, attn_mask, use_reentrant=False)
            else:
                x = run_block(block, x, attn_mask)
        return x

    def get_unconditional_conditioning(self, batch_size: int, device: Any = None) -> list[str]:
        """The null condition as input: ``batch_size`` empty prompts (encode them for the context)."""
        return [""] * batch_size


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """The OpenCLIP embedder of SDXL (sgm ``FrozenOpenCLIPEmbedder2``), ViT-bigG/14 in SDXL.

    ``legacy=True`` behaves as the SD 2.x embedder (the chosen layer after ``ln_final``). With
    ``legacy=False`` (SDXL) the chosen layer's states are returned as they leave the residual
    stream, without ``ln_final``, and ``always_return_pooled`` adds the pooled text vector: the
    last layer after ``ln_final`` at the end token (the highest id of CLIP's vocabulary), times
    ``text_projection`` (CLIP's text embedding, Radford et al. 2021). Output ``(context [B, 77,
    width], pooled [B, embed_dim])`` or the context alone; a long prompt gives ``77 * n_chunks``
    context rows and the pooled vector of its first chunk.
    """

    def __init__(
        self,
        arch: str | dict[str, Any] = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str | torch.device | None = None,
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        always_return_pooled: bool = False,
        legacy: bool = True,
        weights: str | None = None,
        from_hub: bool = False,
        allow_random_weights: bool = False,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        emphasis: bool = True,
    ) -> None:
        if always_return_pooled and legacy:
            raise ConfigError(
                "FrozenOpenCLIPEmbedder2: always_return_pooled=True needs legacy=False (the "
                "pooled vector is taken from the last layer, as in SDXL)."
            )
        self.return_pooled = bool(always_return_pooled)
        self.legacy = bool(legacy)
        super().__init__(
            arch=arch,
            version=version,
            device=device,
            max_length=max_length,
            freeze=freeze,
            layer=layer,
            weights=weights,
            from_hub=from_hub,
            allow_random_weights=allow_random_weights,
            max_chunks=max_chunks,
            emphasis=emphasis,
        )
        if self.return_pooled:  # the projection is needed now; only logit_scale stays optional
            self.model._ldm_guard["optional"] = frozenset({"logit_scale", "logit_bias"})

    def forward(
        self, text: str | Sequence[str] | torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Context ``[B, 77 * n_chunks, width]`` and, with ``always_return_pooled``, the first
        chunk's pooled ``[B, embed_dim]``."""
        if self.legacy:
            return super().forward(text)
        self.check_weights_loaded()
        return self.encode_prompts(text, self._encode_ids, self._module_device())

    def _encode_ids(self, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The chosen layer ``[M, L, width]`` (and the pooled vector) of token ids ``[M, L]``."""
        states = self.encode_states(tokens)
        z = states[self.layer]
        if not self.return_pooled:
            return z
        return z, self.pool(self.model.ln_final(states["last"]), tokens)

    def encode_states(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Residual-stream states ``[B, L, width]`` after the last and the penultimate block."""
        x, attn_mask, batch_first = self.embed_tokens(tokens)
        blocks = self.model.transformer.resblocks
        use_ckpt = (
            getattr(self.model.transformer, "grad_checkpointing", False) and torch.is_grad_enabled()
        )
        states = {}
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                states["penultimate"] = x
            if use_ckpt:
                x = checkpoint(run_block, block, x, attn_mask, use_reentrant=False)
            else:
                x = run_block(block, x, attn_mask)
        states["last"] = x
        if not batch_first:
            states = {k: v.permute(1, 0, 2) for k, v in states.items()}
        return states

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The end-token state (the highest id of CLIP's vocabulary in each row; ids added for
        textual inversion do not count) projected by ``text_projection``."""
        pooled = x[torch.arange(x.shape[0], device=x.device), end_token_positions(tokens)]
        proj = self.model.text_projection
        return proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj
