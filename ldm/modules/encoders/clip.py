"""``FrozenCLIPEmbedder``: the CLIP ViT-L/14 text encoder of Stable Diffusion v1 (Rombach et al. 2022).

Holds ``self.transformer = transformers.CLIPTextModel`` so checkpoint keys read
``cond_stage_model.transformer.*``. Known versions build offline from built-in hyperparameters with
random weights; real weights come from a checkpoint, a local directory or file, or, only when asked
(``from_hub=True``), the Hugging Face hub.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from ldm.modules.encoders.base import (
    AbstractEncoder,
    FrozenWeightsMixin,
    load_weights_file,
    strip_prefixes,
)
from ldm.modules.encoders.clip_fast import clip_text_forward
from ldm.modules.encoders.long_prompt import DEFAULT_MAX_CHUNKS, LongPromptMixin
from ldm.modules.encoders.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, get_tokenizer
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

_VIT_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "projection_dim": 768}  # fmt: skip
_VIT_B = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
          "num_attention_heads": 8, "projection_dim": 512}  # fmt: skip

#: Text-tower hyperparameters of the released OpenAI CLIP models (their hub ``config.json``).
KNOWN_CLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": _VIT_L,
    "openai/clip-vit-large-patch14-336": _VIT_L,
    "openai/clip-vit-base-patch32": _VIT_B,
    "openai/clip-vit-base-patch16": _VIT_B,
}

#: Settings shared by all OpenAI CLIP text towers. ``eos_token_id=2`` is the hub value: with it
#: ``CLIPTextModel`` pools at ``argmax(input_ids)``, the first end token, as the original CLIP does.
CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": CONTEXT_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def build_clip_text_config(overrides: dict[str, Any]) -> Any:
    """``transformers.CLIPTextConfig`` from the CLIP defaults updated by ``overrides``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**CLIP_TEXT_DEFAULTS, **overrides})


def remap_clip_text_keys(model: Any, state_dict: dict[str, Any], prefix: str) -> None:
    """Rename, in place, ``CLIPTextModel`` keys with or without ``text_model.`` (transformers 4 vs 5).

    ``prefix`` is the model's prefix in ``state_dict``; old files also carry ``position_ids``.
    """
    own = set(model.state_dict(keep_vars=True))
    level = any(k.startswith("text_model.") for k in own)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if level and not rest.startswith("text_model."):
            rest = "text_model." + rest
        elif not level and rest.startswith("text_model."):
            rest = rest[len("text_model.") :]
        if rest.endswith("embeddings.position_ids") and rest not in own:
            del state_dict[key]  # a constant buffer that older transformers saved
            continue
        if prefix + rest != key:
            state_dict[prefix + rest] = state_dict.pop(key)
    # a persistent position_ids buffer (some transformers 4.x) that the file lacks
    for name in own:
        if name.endswith("embeddings.position_ids") and prefix + name not in state_dict:
            state_dict[prefix + name] = model.get_buffer(name)


def set_hf_checkpointing(model: Any, enable: bool = True) -> None:
    """Activation recomputation in a transformers model's layers (non-reentrant; transformers
    applies it only while the model is in training mode)."""
    if enable:
        on = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if on is not None:
            on(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    else:
        off = getattr(model, "activation_checkpointing_disable", None)
        (off or model.gradient_checkpointing_disable)()


class FrozenCLIPEmbedder(LongPromptMixin, FrozenWeightsMixin, AbstractEncoder):
    """CLIP text encoder (Radford et al. 2021) giving SD's cross-attention context ``[B, 77, D]``.

    ``layer``: ``"last"`` (final states after the last layer norm, SD v1), ``"pooled"`` (end-token
    state, ``[B, 1, D]``) or ``"hidden"`` (``hidden_states[layer_idx]``, no final norm, SD 2.x).
    Long prompts are encoded in chunks of 77 (``[B, 77 * n, D]``, at most ``max_chunks``) and
    ``emphasis`` parses ``(word:1.3)`` weights (``ldm.modules.encoders.long_prompt``).
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        weights: str | None = None,
        from_hub: bool = False,
        allow_random_weights: bool = False,
        config: dict[str, Any] | None = None,
        tokenizer: str = "sd-v1",
        always_return_pooled: bool = False,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        emphasis: bool = True,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ConfigError(
                f"FrozenCLIPEmbedder: layer='{layer}' is not one of {list(self.LAYERS)}."
            )
        self.version = version
        self.device_hint = device  # tokens follow the parameters' device; kept for compatibility
        self.max_length = int(max_length)
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = bool(always_return_pooled)  # sgm: (context, pooled end-token state)
        self.tokenizer = get_tokenizer(tokenizer, self.max_length)
        self.init_long_prompts(max_chunks, emphasis)

        loaded = False
        from transformers import CLIPTextModel

        if config is not None:
            self.transformer = CLIPTextModel(build_clip_text_config(dict(config)))
        elif os.path.isdir(version):
            self.transformer = CLIPTextModel.from_pretrained(version, local_files_only=True)
            loaded = True
        elif from_hub:
            logger.info("FrozenCLIPEmbedder: loading '%s' through the Hugging Face hub", version)
            try:
                self.transformer = CLIPTextModel.from_pretrained(version)
            except (OSError, ValueError) as err:
                raise FileNotFoundError(
                    f"FrozenCLIPEmbedder: from_hub=True but '{version}' could not be loaded from "
                    f"the Hugging Face hub or its cache ({type(err).__name__}: {err}). Pass a "
                    "local directory as version=..., or leave from_hub off to build the built-in "
                    "architecture and load the weights from a Stable Diffusion checkpoint."
                ) from err
            loaded = True
        elif version in KNOWN_CLIP_TEXT_CONFIGS:
            cfg = build_clip_text_config(KNOWN_CLIP_TEXT_CONFIGS[version])
            self.transformer = CLIPTextModel(cfg)
        else:
            raise ConfigError(
                f"FrozenCLIPEmbedder: unknown version '{version}'. Built-in architectures: "
                f"{sorted(KNOWN_CLIP_TEXT_CONFIGS)}. Pass a local directory holding a Hugging Face "
                "CLIP config.json and weights as version=..., a dict of CLIPTextConfig fields as "
                "config=..., or from_hub=True to download (needs network)."
            )
        n_layers = self.transformer.config.num_hidden_layers
        if layer == "hidden":
            if layer_idx is None or not -n_layers - 1 <= int(layer_idx) <= n_layers:
                raise ConfigError(
                    f"FrozenCLIPEmbedder: layer='hidden' needs layer_idx in [-{n_layers + 1}, "
                    f"{n_layers}] (index into the {n_layers + 1} hidden states), got {layer_idx!r}."
                )
        own = self.transformer.state_dict(keep_vars=True)
        self._setup_guard(
            self.transformer,
            freeze,
            allow_random_weights,
            optional_keys={k for k in own if k.endswith("position_ids")},
            remap=remap_clip_text_keys,
        )
        self.weights_loaded = loaded
        if weights is not None:
            self.load_weights(weights)

    # ------------------------------------------------------------------ weights
    def load_weights(self, path: str) -> None:
        """Load text-encoder weights from a local HF directory or a state-dict file."""
        if os.path.isdir(path):
            from transformers import CLIPTextModel

            sd = CLIPTextModel.from_pretrained(path, local_files_only=True).state_dict()
        elif os.path.isfile(path):
            sd = strip_prefixes(
                load_weights_file(path), ("cond_stage_model.transformer.", "transformer.")
            )
        else:
            raise FileNotFoundError(
                f"FrozenCLIPEmbedder: weights '{path}' is neither a directory nor a file. Pass a "
                "Hugging Face CLIP directory or a .safetensors/.pt state dict of CLIPTextModel."
            )
        self.load_state_dict({"transformer." + k: v for k, v in sd.items()}, strict=True)

    def _describe(self) -> str:
        return f"CLIP text encoder '{self.version}'"

    def _weights_hint(self) -> str:
        return "weights=<HF CLIP directory or state-dict file>, or version=<local HF directory>"

    # ------------------------------------------------------------------ encoding
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the transformer layers' activations in backward (when training)."""
        set_hf_checkpointing(self.transformer, enable)

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, max_length]`` as SD v1's Hugging Face tokenizer gives them (truncated;
        ``tokenize_chunks`` gives the chunks ``forward`` encodes)."""
        batch = self.tokenizer(
            text,
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"]

    def forward(
        self, text: str | Sequence[str] | torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Context ``[B, 77 * n_chunks, D]`` (``[B, 1, D]`` for ``layer='pooled'``) for prompts or
        token ids; with ``always_return_pooled`` also the first chunk's end-token state ``[B, D]``."""
        self.check_weights_loaded()
        return self.encode_prompts(text, self._encode_ids, self._module_device())

    def _encode_ids(self, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The chosen layer ``[M, L, D]`` (and the pooled state) of token ids ``[M, L]``; on the
        CPU without an autograd graph through ``clip_fast`` (same outputs, packed weights)."""
        hidden = self.layer == "hidden"
        fast = clip_text_forward(self.transformer, tokens, hidden=hidden)
        if fast is not None:
            last, pooled, states = fast
        else:
            outputs = self.transformer(input_ids=tokens, output_hidden_states=hidden)
            last, pooled, states = (
                outputs.last_hidden_state,
                outputs.pooler_output,
                outputs.hidden_states,
            )
        if self.layer == "last":
            z = last
        elif self.layer == "pooled":
            z = pooled[:, None, :]
        else:
            z = states[self.layer_idx]
        return (z, pooled) if self.return_pooled else z

    def get_unconditional_conditioning(self, batch_size: int, device: Any = None) -> list[str]:
        """The null condition as input: ``batch_size`` empty prompts (encode them for the context)."""
        return [""] * batch_size
