"""Extract a LoRA from two checkpoints by truncated SVD of their difference (as sd-scripts
`networks/extract_lora_from_models.py`, after cloneofsimo/lora `cli_svd.py`).

delta = tuned - base on the LoRA targets: U-Net attention, feed-forward and proj_in/proj_out
(rank), ResBlock / Downsample / Upsample weights when `conv_rank` is given (3x3 kernels flattened to
[out, in*kh*kw], rank `conv_rank`; 1x1 and linear ones at `rank`), text-encoder linears when an
encoder changed by more than `min_diff`. delta = U S Vh in float32; up = U[:, :r] S[:r],
down = Vh[:r], alpha = r (scale 1); optionally both clamped to the `clamp_quantile` of their values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ldm.adapters.lora_family import model_family
from ldm.adapters.lora_layout import UNET, Layout, TextSlot, layout_of
from ldm.adapters.lora_rows import add_module
from ldm.adapters.lora_weights import LoraError, LoraModule, LoraSet

logger = logging.getLogger(__name__)

_ATTN = re.compile(
    r"\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.weight$"
)
_CONV = re.compile(
    r"^(input_blocks|middle_block|output_blocks)\.\d+\.(\d+\.)?"
    r"(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)\.weight$"
)
_CLIP = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")
_OPENCLIP = re.compile(
    r"transformer\.resblocks\.\d+\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
    r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$"
)


def unet_target(key: str, convs: bool) -> bool:
    """A U-Net LoRA target: transformer linears always, ResBlock / resampler weights with `convs`."""
    rest = key[len(UNET) :]
    return bool(_ATTN.search("." + rest)) or (convs and bool(_CONV.match(rest)))


def text_target(key: str, slot: TextSlot) -> bool:
    """A text-encoder LoRA target: attention projections and MLP linears."""
    pattern = _CLIP if slot.kind == "clip" else _OPENCLIP
    return bool(pattern.search(key[len(slot.prefix) :]))


def svd_factors(
    delta: Tensor, rank: int, clamp_quantile: float | None
) -> tuple[Tensor, Tensor, int]:
    """(up, down, r): the best rank-r factors of a [out, in] matrix (Eckart-Young), r <= min dims."""
    r = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    up, down = u[:, :r] * s[:r], vh[:r]
    if clamp_quantile is not None and clamp_quantile < 1:
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up.contiguous(), down.contiguous(), r


def extract_module(
    delta: Tensor, rank: int, conv_rank: int | None, clamp_quantile: float | None
) -> LoraModule:
    """A LoRA module approximating one weight difference (linear, 1x1 or kxk conv)."""
    d = delta.float()
    if d.ndim == 4 and d.shape[2:] != (1, 1):
        out, inp, kh, kw = d.shape
        up, down, r = svd_factors(d.reshape(out, -1), conv_rank or rank, clamp_quantile)
        return LoraModule(down.reshape(r, inp, kh, kw), up[:, :, None, None], float(r))
    if d.ndim == 4:  # 1x1 conv: a linear map, stored as kohya does ([r, in, 1, 1], [out, r, 1, 1])
        up, down, r = svd_factors(d[:, :, 0, 0], rank, clamp_quantile)
        return LoraModule(down[:, :, None, None], up[:, :, None, None], float(r))
    up, down, r = svd_factors(d, rank, clamp_quantile)
    return LoraModule(down, up, float(r))


def _differs(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], keys: list[str]) -> float:
    return max(((tuned[k].float() - base[k].float()).abs().max().item() for k in keys), default=0.0)


def _targets(sd: Mapping[str, Tensor], layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every LoRA target of a state dict (convs included) -> its shape."""
    keys = [k for k in sd if k.startswith(UNET) and unet_target(k, True)]
    for slot in layout.texts:
        keys += [k for k in sd if k.startswith(slot.prefix) and text_target(k, slot)]
    return {k: tuple(sd[k].shape) for k in keys}


def check_same_model(
    base_sd: Mapping[str, Tensor], tuned_sd: Mapping[str, Tensor], names: tuple[str, str]
) -> None:
    """LoraError unless both state dicts are the same model (family, layout, LoRA targets with
    their shapes): a delta between two different models is no fine-tune, whatever keys match."""
    base, tuned = names
    fix = (
        "A LoRA is extracted from a fine-tuned checkpoint and the very checkpoint it was "
        "fine-tuned from: give that one as the base."
    )
    fam_b = model_family({k: v.shape for k, v in base_sd.items()})
    fam_t = model_family({k: v.shape for k, v in tuned_sd.items()})
    lay_b, lay_t = layout_of(base_sd), layout_of(tuned_sd)
    if str(fam_b) != str(fam_t):
        raise LoraError(f"{base} is {fam_b} but {tuned} is {fam_t}: different models. {fix}")
    if lay_b != lay_t:
        what = "text encoders" if lay_b.texts != lay_t.texts else "U-Net blocks"
        raise LoraError(f"{base} and {tuned} are laid out differently ({what}). {fix}")
    want, got = _targets(base_sd, lay_b), _targets(tuned_sd, lay_t)
    only_b, only_t = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    reshaped = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if not (only_b or only_t or reshaped):
        return
    if reshaped:
        k = reshaped[0]
        example = f"`{k}` is {list(want[k])} in {base} but {list(got[k])} in {tuned}"
    else:
        k = (only_b or only_t)[0]
        example = f"`{k}` is only in {base if only_b else tuned}"
    raise LoraError(
        f"{base} and {tuned} are different models: {len(only_b) + len(only_t) + len(reshaped)} "
        f"LoRA target weights differ ({len(only_b)} only in {base}, {len(only_t)} only in "
        f"{tuned}, {len(reshaped)} with other shapes), e.g. {example}. {fix}"
    )


def extract_lora(
    base_sd: Mapping[str, Tensor],
    tuned_sd: Mapping[str, Tensor],
    rank: int,
    conv_rank: int | None = None,
    clamp_quantile: float | None = 0.99,
    min_diff: float = 0.01,
    names: tuple[str, str] = ("the base checkpoint", "the tuned checkpoint"),
) -> LoraSet:
    """The LoRA (keyed by engine keys, alpha = rank) that turns `base_sd` into about `tuned_sd`;
    LoraError when the two are not the same model (`names` name them in the message)."""
    from ldm.checkpoint.loader import match_clip_layout

    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"rank and conv_rank must be >= 1, got {rank} and {conv_rank}.")
    tuned_sd = match_clip_layout(dict(tuned_sd), set(base_sd))  # old/new CLIP key levels
    check_same_model(base_sd, tuned_sd, names)
    shared = [k for k in base_sd if k in tuned_sd and base_sd[k].shape == tuned_sd[k].shape]
    layout = layout_of(base_sd)
    keys = [k for k in shared if k.startswith(UNET) and unet_target(k, conv_rank is not None)]
    for slot in layout.texts:
        text = [k for k in shared if k.startswith(slot.prefix) and text_target(k, slot)]
        diff = _differs(base_sd, tuned_sd, text)
        if diff > min_diff:
            keys += text
        elif text:
            logger.info(
                "Text encoder %s unchanged (max |diff| %.3g <= %s)", slot.prefix, diff, min_diff
            )
    out: LoraSet = {}
    for key in keys:
        delta = tuned_sd[key].float() - base_sd[key].float()
        if not delta.any():
            continue  # nothing to learn from an unchanged weight
        if key.endswith("in_proj_weight"):  # OpenCLIP q | k | v: one LoRA per third, as files hold
            n = delta.shape[0] // 3
            for i in range(3):
                if not delta[i * n : (i + 1) * n].any():
                    continue
                m = extract_module(delta[i * n : (i + 1) * n], rank, conv_rank, clamp_quantile)
                m.rows = (i * n, (i + 1) * n)
                add_module(out, key, m, delta.shape[0])
            continue
        out[key] = extract_module(delta, rank, conv_rank, clamp_quantile)
    logger.info("Extracted %d LoRA modules (rank %d, conv rank %s)", len(out), rank, conv_rank)
    return out
