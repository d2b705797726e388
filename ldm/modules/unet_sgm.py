"""The U-Net of Stability's generative-models (``sgm.modules.diffusionmodules.openaimodel.UNetModel``).

Same modules and state-dict keys as :class:`ldm.modules.unet.UNetModel`; only the constructor
differs: sgm always uses spatial transformers (no ``use_spatial_transformer`` flag), computes heads
without the CompVis ``legacy`` quirk, gives the middle block the last level's transformer depth,
and names the attention kernel ``spatial_transformer_attn_type``. SDXL base and refiner configs
(``configs/stable-diffusion/sdxl-*.yaml``) build through this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ldm.modules.unet import UNetModel
from ldm.util import ConfigError

#: sgm attention kernel names -> our attention backends (None: $LDM_ATTENTION_BACKEND / sdpa)
ATTN_TYPES: dict[str, str | None] = {
    "softmax": None,
    "softmax-xformers": None,  # xformers when asked for at run time; sdpa is exact and portable
    "vanilla": None,
    "vanilla-xformers": None,
}


class SGMUNetModel(UNetModel):
    """U-Net with the sgm constructor (SDXL: per-level transformer depth, vector conditioning)."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | Sequence[int] | None = None,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        disable_middle_transformer: bool = False,
        use_linear_in_transformer: bool = False,
        spatial_transformer_attn_type: str = "softmax",
        adm_in_channels: int | None = None,
        use_fp16: bool = False,
        image_size: int | None = None,
        attn_backend: str | None = None,
        **unsupported: Any,
    ) -> None:
        if unsupported:
            names = sorted(unsupported)
            raise ConfigError(
                f"SGMUNetModel (sgm.modules.diffusionmodules.openaimodel.UNetModel): unknown "
                f"parameter(s) {names}. Accepted: the sgm UNetModel parameters (in_channels, "
                "model_channels, transformer_depth, context_dim, adm_in_channels, ...)."
            )
        if disable_middle_transformer:
            raise ConfigError(
                "SGMUNetModel: disable_middle_transformer=True (no attention in the middle block) "
                "is not supported; SDXL configs leave it false."
            )
        if spatial_transformer_attn_type not in ATTN_TYPES:
            raise ConfigError(
                f"SGMUNetModel: spatial_transformer_attn_type={spatial_transformer_attn_type!r}; "
                f"expected one of {sorted(ATTN_TYPES)}."
            )
        if context_dim is None:
            raise ConfigError(
                "SGMUNetModel: context_dim is required (sgm's U-Net always has cross-attention); "
                "SDXL base uses 2048, the refiner 1280."
            )
        super().__init__(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            num_classes=num_classes,
            use_checkpoint=use_checkpoint,
            use_fp16=use_fp16,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_spatial_transformer=True,
            transformer_depth=transformer_depth,
            context_dim=context_dim,
            legacy=False,
            disable_self_attentions=disable_self_attentions,
            num_attention_blocks=num_attention_blocks,
            disable_middle_self_attn=disable_middle_self_attn,
            use_linear_in_transformer=use_linear_in_transformer,
            adm_in_channels=adm_in_channels,
            attn_backend=attn_backend or ATTN_TYPES[spatial_transformer_attn_type],
        )
