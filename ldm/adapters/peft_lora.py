"""LoRA training on our modules through ``peft`` (Hu et al. 2021; conv layers as LoCon).

``W x + (alpha / r) B A x`` with A [r, in] (conv: [r, in, kh, kw]) and B [out, r] (1x1), B = 0 at
the start. Targets are chosen by preset names or regular expressions over module names inside the
U-Net (and, with ``text_encoder``, inside the HF CLIP text encoders); only ``nn.Linear`` and
``nn.Conv2d`` layers are wrapped. ``peft.inject_adapter_in_model`` does the wrapping and freezes
everything else of the wrapped module; the trained weights leave as a ``LoraSet`` keyed by the
engine's state-dict key of each target weight, so they are written in the kohya or diffusers
format by ``ldm.adapters.lora_file``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
#: Module-name patterns (full match, relative to the U-Net) of each target preset (kohya's names).
UNET_PRESETS: dict[str, str] = {
    "attention": r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "feedforward": r".*\.ff\.net\.(0\.proj|2)",
    "projection": r".*\.(proj_in|proj_out)",
    "resnet": r".*\.(in_layers\.2|out_layers\.3|skip_connection)",  # LoCon: ResBlock convs
    "crossattn_kv": r".*\.attn2\.(to_k|to_v)",  # Custom Diffusion (Kumari et al. 2023)
}
DEFAULT_TARGETS = ("attention", "feedforward", "projection")  # kohya's networks.lora on the U-Net
TEXT_PATTERN = r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
WRAPPABLE = (nn.Linear, nn.Conv2d)


@dataclass
class LoraTrainingConfig:
    """The ``adapter`` section of a config with ``type: lora``."""

    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    targets: Sequence[str] = DEFAULT_TARGETS  # preset names or regular expressions
    conv_rank: int | None = None  # rank of 3x3 convs (LoCon); None: the "resnet" preset uses rank
    conv_alpha: float | None = None
    text_encoder: bool = False  # also LoRA on the HF CLIP text encoder(s)
    text_encoder_rank: int | None = None
    name: str = "lora"  # file name of the exported adapter
    save_format: str = "kohya"  # kohya | diffusers
    base_weights: str = "ema"  # ema | model: the base checkpoint's weights the LoRA sits on

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"adapter.rank={self.rank}: expected a positive integer.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"adapter.dropout={self.dropout}: expected a value in [0, 1).")
        if self.save_format not in ("kohya", "diffusers"):
            raise ConfigError(
                f"adapter.save_format={self.save_format!r}: expected 'kohya' or 'diffusers'."
            )
        if self.base_weights not in ("ema", "model"):
            raise ConfigError(f"adapter.base_weights={self.base_weights!r}: expected ema or model.")
        if isinstance(self.targets, str):
            self.targets = [self.targets]

    def patterns(self) -> list[str]:
        """The target regular expressions (presets expanded)."""
        return [UNET_PRESETS.get(t, t) for t in self.targets]


def _compile(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise ConfigError(
                f"adapter.targets: {p!r} is neither a preset ({sorted(UNET_PRESETS)}) nor a "
                f"valid regular expression ({err})."
            ) from None
    return out


def matching_modules(root: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the Linear / Conv2d modules under ``root`` whose name fully matches a pattern."""
    compiled = _compile(patterns)
    return [
        name
        for name, module in root.named_modules()
        if isinstance(module, WRAPPABLE) and any(p.fullmatch(name) for p in compiled)
    ]


def hf_text_models(engine: nn.Module) -> dict[str, nn.Module]:
    """{engine path: HF CLIPTextModel} of the engine's text encoders that LoRA can wrap."""
    found = {}
    for path, module in engine.named_modules():
        if type(module).__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            found[path] = module
    return found


def _inject(
    root: nn.Module,
    names: list[str],
    rank: int,
    alpha: float,
    cfg: LoraTrainingConfig,
    conv_rank: int,
    conv_alpha: float,
) -> None:
    """peft LoRA on exactly ``names`` (full names under ``root``); 3x3 convs get conv_rank."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = {n: root.get_submodule(n) for n in names}
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(cfg.dropout),
        target_modules=names,
        rank_pattern={f"^{re.escape(n)}$": int(conv_rank) for n in convs},
        alpha_pattern={f"^{re.escape(n)}$": float(conv_alpha) for n in convs},
        bias="none",
    )
    inject_adapter_in_model(config, root, adapter_name=ADAPTER_NAME)


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(
            "LoRA training needs the 'peft' package: pip install -e '.[adapters]' (or pip install "
            "peft)."
        ) from None


class LoraTraining:
    """LoRA layers injected into an engine's U-Net (and text encoders): parameters, export."""

    kind = "lora"

    def __init__(self, engine: nn.Module, config: Mapping[str, Any]) -> None:
        require_peft()
        known = set(LoraTrainingConfig.__dataclass_fields__)
        unknown = sorted(set(config) - known - {"type"})
        if unknown:
            raise ConfigError(
                f"adapter (type lora): unknown key(s) {unknown}; known: {sorted(known)}."
            )
        self.config = LoraTrainingConfig(**{k: v for k, v in config.items() if k != "type"})
        cfg = self.config
        rank = int(cfg.rank)
        alpha = float(cfg.alpha if cfg.alpha is not None else rank)
        conv_rank = int(cfg.conv_rank or rank)
        conv_alpha = float(cfg.conv_alpha if cfg.conv_alpha is not None else conv_rank)
        for p in engine.parameters():
            p.requires_grad_(False)
        self.roots: dict[str, nn.Module] = {}
        self.shapes = engine_shapes(engine)  # before wrapping: the layout files are named for
        unet = engine.model.diffusion_model
        names = matching_modules(unet, cfg.patterns())
        if not names:
            raise ConfigError(
                f"adapter.targets {list(cfg.targets)} match no Linear/Conv2d module of the U-Net "
                f"(presets: {sorted(UNET_PRESETS)}; patterns match module names such as "
                "'input_blocks.1.1.transformer_blocks.0.attn1.to_q')."
            )
        _inject(unet, names, rank, alpha, cfg, conv_rank, conv_alpha)
        self.roots["model.diffusion_model."] = unet
        if cfg.text_encoder:
            encoders = hf_text_models(engine)
            if not encoders:
                raise ConfigError(
                    "adapter.text_encoder=true but the model has no Hugging Face CLIP text "
                    "encoder to wrap (OpenCLIP towers are not supported for LoRA training)."
                )
            others = [
                type(m).__name__
                for m in engine.modules()
                if type(m).__name__.startswith("FrozenOpenCLIPEmbedder")
            ]
            if others:
                logger.warning(
                    "adapter.text_encoder: LoRA goes on the Hugging Face CLIP text encoder(s) "
                    "only; %s stays without one (open_clip's packed attention is not wrapped).",
                    ", ".join(others),
                )
            te_rank = int(cfg.text_encoder_rank or rank)
            for path, module in encoders.items():
                te_names = matching_modules(module, [TEXT_PATTERN])
                te_alpha = float(cfg.alpha or te_rank)
                _inject(module, te_names, te_rank, te_alpha, cfg, te_rank, float(te_rank))
                self.roots[path + "."] = module
        n = sum(p.numel() for p in self.trainable_parameters())
        logger.info(
            "LoRA: rank %d, alpha %g on %d U-Net modules%s; %d trainable parameters.",
            rank,
            alpha,
            len(names),
            " and the text encoder(s)" if cfg.text_encoder else "",
            n,
        )

    def layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(engine key of the wrapped weight without ``.weight``, peft LoRA layer)."""
        from peft.tuners.lora import LoraLayer

        for prefix, root in self.roots.items():
            for name, module in root.named_modules():
                if isinstance(module, LoraLayer):
                    yield prefix + name, module

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p for _, layer in self.layers() for n, p in layer.named_parameters() if "lora_" in n
        ]

    def owns(self, key: str) -> bool:
        """Whether a state-dict key holds adapter weights (saved in adapter-only checkpoints)."""
        return ".lora_A." in key or ".lora_B." in key

    def after_step(self) -> None:
        """Nothing to restore: the frozen weights have no gradient."""

    def lora_set(self) -> dict[str, Any]:
        """The current LoRA weights as a LoraSet keyed by the engine key of each base weight."""
        from ldm.adapters.lora_weights import LoraModule

        out = {}
        for key, layer in self.layers():
            down = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone()
            up = layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone()
            r = int(layer.r[ADAPTER_NAME])
            alpha = float(layer.lora_alpha[ADAPTER_NAME])
            out[key + ".weight"] = LoraModule(down=down, up=up, alpha=alpha if alpha != r else None)
        return out

    def export(self, directory: Any) -> list[Any]:
        """Write the adapter file (``<name>.safetensors``, kohya or diffusers format)."""
        from pathlib import Path

        from ldm.adapters.lora_io import save_lora

        path = Path(directory) / f"{self.config.name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_lora(path, self.lora_set(), self.shapes, format=self.config.save_format)
        return [path]


def engine_shapes(engine: nn.Module) -> dict[str, torch.Size]:
    """Shapes of every engine weight under its original key (peft's ``base_layer`` removed)."""
    return {
        k.replace(".base_layer.", "."): v.shape
        for k, v in engine.state_dict().items()
        if ".lora_" not in k
    }
