"""``ClassEmbedder``: learned class-label embedding for class-conditional LDMs (Rombach et al. 2022).

SD 2.x form with a null class (``n_classes - 1``) for classifier-free guidance (Ho & Salimans 2022):
while training, each label is replaced by the null class with probability ``ucg_rate``.
The CompVis latent-diffusion configs (``key: class_label``, no ``ucg_rate``) build unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class ClassEmbedder(nn.Module):
    """``batch[key]`` (int labels ``[B]``) -> embeddings ``[B, 1, embed_dim]`` (key ``embedding.weight``)."""

    def __init__(
        self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.1
    ) -> None:
        super().__init__()
        if not 0.0 <= float(ucg_rate) <= 1.0:
            raise ValueError(f"ClassEmbedder: ucg_rate must be in [0, 1], got {ucg_rate}.")
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)
        self.n_classes = int(n_classes)
        self.ucg_rate = float(ucg_rate)

    @property
    def null_class(self) -> int:
        """Label used for the unconditional branch of classifier-free guidance."""
        return self.n_classes - 1

    def forward(
        self,
        batch: dict[str, Any] | torch.Tensor,
        key: str | None = None,
        disable_dropout: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Embed the labels; in training mode drop each to the null class with prob. ``ucg_rate``."""
        # a batch dict (CompVis), or the labels themselves: a tensor, a list or a tuple of ints
        labels = batch[key or self.key] if isinstance(batch, Mapping) else batch
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise ValueError(
                f"ClassEmbedder: expected labels of shape [B], got {tuple(labels.shape)}."
            )
        if (labels < 0).any() or (labels >= self.n_classes).any():
            raise ValueError(
                f"ClassEmbedder: labels must lie in [0, {self.n_classes - 1}], found "
                f"[{int(labels.min())}, {int(labels.max())}]. Raise n_classes in the config."
            )
        if self.training and self.ucg_rate > 0.0 and not disable_dropout:
            u = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device)
            labels = torch.where(
                u < self.ucg_rate, torch.full_like(labels, self.null_class), labels
            )
        return self.embedding(labels[:, None])  # [B, 1] -> [B, 1, D]

    def encode(self, batch: dict[str, Any] | torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Same as ``forward``."""
        return self(batch, **kwargs)

    def get_unconditional_conditioning(
        self, bs: int, device: str | torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Input batch of null classes ``{key: [bs]}`` (encode it for the null embedding)."""
        device = self.embedding.weight.device if device is None else device
        return {self.key: torch.full((bs,), self.null_class, dtype=torch.long, device=device)}
