"""Pictures for `log_images`: captions rendered as images, rows of noised / denoised images."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont


def log_txt_as_img(wh: tuple[int, int], xc: Sequence[str], size: int = 10) -> torch.Tensor:
    """Captions drawn in black on white with PIL's default font -> [B, 3, H, W] in [-1, 1]."""
    w, h = wh
    font = ImageFont.load_default()
    chars_per_line = max(1, int(40 * (w / 256)))
    images = []
    for caption in xc:
        canvas = Image.new("RGB", wh, color="white")
        draw = ImageDraw.Draw(canvas)
        lines = "\n".join(textwrap.wrap(str(caption), chars_per_line))
        draw.text((0, 0), lines, fill="black", font=font)
        arr = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # [3, H, W]
        images.append(torch.from_numpy(arr))
    return torch.stack(images)


def grid_from_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """n_rows tensors of [B, C, H, W] -> one image [C, B*H, n_rows*W]: one column per sample."""
    import torchvision

    stacked = torch.stack(list(rows))  # [n_rows, B, C, H, W]
    n_rows = stacked.shape[0]
    stacked = rearrange(stacked, "n b c h w -> (b n) c h w")
    return torchvision.utils.make_grid(stacked, nrow=n_rows)


def class_labels_as_text(labels: torch.Tensor, names: Sequence[str] | None = None) -> list[str]:
    """Integer labels [B] -> strings (human names when given) for log_txt_as_img."""
    out = []
    for i in labels.flatten().tolist():
        out.append(names[int(i)] if names is not None else f"class {int(i)}")
    return out
