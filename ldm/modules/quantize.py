"""Vector quantizer of VQ-VAE / VQGAN (van den Oord et al. 2017; Esser et al. 2021), improved codebook use.

`VectorQuantizer` is compatible with taming's `VectorQuantizer2` (key `embedding.weight`, the
`legacy` loss order, index `remap`, `sane_index_shape`). Beyond the originals: an EMA codebook
(van den Oord et al. 2017, App. A.1) and restarting dead codes from encoder outputs
(Dhariwal et al. 2020, Jukebox, Sec. 3.2). Their state buffers are only registered when enabled, so
the plain quantizer's state dict equals the LDM checkpoints'.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["VectorQuantizer", "codebook_perplexity", "codebook_usage"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def codebook_perplexity(indices: torch.Tensor, n_e: int) -> torch.Tensor:
    """exp(H(p)) of the empirical code distribution p; n_e when all codes are used equally."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_e).float()
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-torch.sum(p * torch.log(p + 1e-10)))


def codebook_usage(indices: torch.Tensor, n_e: int) -> torch.Tensor:
    """Fraction of the n_e codes that `indices` use at least once."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_e)
    return (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """z_q = e_k with k = argmin_j ||z - e_j||, straight-through gradient (VQ-VAE Eq. 3).

    loss = ||sg(z) - z_q||^2 + beta ||z - sg(z_q)||^2 with `legacy=True` (taming's order, which
    puts beta on the codebook term: beta * ||sg(z)-z_q||^2 + ||z-sg(z_q)||^2 when legacy=False).
    With `ema=True` the codebook follows exponential moving averages of its assigned encoder
    outputs and the loss keeps only the commitment term beta ||z - sg(z_q)||^2.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        remap: str | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1e-3,
        usage_decay: float = 0.99,
    ) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_threshold = dead_code_threshold
        self.usage_decay = usage_decay
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(n_e))
            self.register_buffer("ema_embed_sum", self.embedding.weight.data.clone())
        if restart_dead_codes:
            # EMA of per-code assignment counts per batch; starts "alive" so nothing restarts at once
            self.register_buffer("code_usage", torch.ones(n_e))
        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.as_tensor(np.load(remap)))
            self.re_embed = int(self.used.shape[0])
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
            logger.info(
                "Remapping %d indices to %d indices (unknown: %s).",
                n_e,
                self.re_embed,
                self.unknown_index,
            )
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    # index remapping (taming's remap_to_used / unmap_to_all)
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Map codebook indices [B, N] to positions in `used`; unknown ones to `unknown_index`."""
        shape = inds.shape
        inds = inds.reshape(shape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()  # [B, N, U]
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(
                0, self.re_embed, size=new[unknown].shape, device=new.device
            )
        else:
            new[unknown] = self.unknown_index
        return new.reshape(shape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Inverse of `remap_to_used`: positions in `used` [B, N] -> codebook indices."""
        shape = inds.shape
        inds = inds.reshape(shape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:  # extra token
            inds[inds >= used.shape[0]] = 0
        return torch.gather(used[None, :][inds.shape[0] * [0], :], 1, inds).reshape(shape)

    def forward(
        self,
        z: torch.Tensor,
        temp: float | None = None,
        rescale_logits: bool = False,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, None, torch.Tensor]]:
        """z [B, C, H, W] -> (z_q [B, C, H, W], loss, (perplexity, None, indices))."""
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("VectorQuantizer supports neither Gumbel temperature nor logits.")
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]
        z_flat = z.reshape(-1, self.e_dim)  # [BHW, C]
        codebook = self.embedding.weight
        d = (
            z_flat.pow(2).sum(dim=1, keepdim=True)
            + codebook.pow(2).sum(dim=1)
            - 2.0 * z_flat @ codebook.t()
        )  # [BHW, n_e]
        indices = torch.argmin(d, dim=1)  # [BHW]
        z_q = self.embedding(indices).view(z.shape)  # [B, H, W, C]

        if self.training and self.ema:
            self._ema_update(z_flat.detach(), indices)
        commitment = torch.mean((z_q.detach() - z).pow(2))
        if self.ema:
            loss = self.beta * commitment
        else:
            codebook_term = torch.mean((z_q - z.detach()).pow(2))
            if self.legacy:
                loss = commitment + self.beta * codebook_term
            else:
                loss = self.beta * commitment + codebook_term
        if self.training and self.restart_dead_codes:
            self._restart_dead_codes(z_flat.detach(), indices)

        perplexity = codebook_perplexity(indices, self.n_e)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]

        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])  # [B, H, W]
        return z_q, loss, (perplexity, None, indices)

    @torch.no_grad()
    def _ema_update(self, z_flat: torch.Tensor, indices: torch.Tensor) -> None:
        """N_i <- g N_i + (1-g) n_i; m_i <- g m_i + (1-g) sum z; e_i = m_i / N_i (VQ-VAE App. A.1)."""
        onehot = F.one_hot(indices, self.n_e).to(z_flat.dtype)  # [BHW, n_e]
        counts = onehot.sum(0)  # [n_e]
        sums = onehot.t() @ z_flat  # [n_e, C]
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_cluster_size.mul_(self.decay).add_(counts.float(), alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums.float(), alpha=1 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (n + self.n_e * self.eps) * n  # Laplace
        self.embedding.weight.data.copy_(self.ema_embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: torch.Tensor, indices: torch.Tensor) -> int:
        """Re-seed codes whose usage EMA fell below the threshold with random encoder outputs."""
        counts = torch.bincount(indices, minlength=self.n_e).float()
        if _distributed():
            dist.all_reduce(counts)
        self.code_usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        dead = self.code_usage < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        pick = torch.randint(0, z_flat.shape[0], (n_dead,), device=z_flat.device)
        new_codes = z_flat[pick] + 1e-3 * torch.randn_like(z_flat[pick])
        if _distributed():  # every rank must restart to the same vectors
            dist.broadcast(new_codes, src=0)
        self.embedding.weight.data[dead] = new_codes.to(self.embedding.weight.dtype)
        if self.ema:
            self.ema_embed_sum[dead] = new_codes.float()
            self.ema_cluster_size[dead] = 1.0
        self.code_usage[dead] = 1.0
        logger.debug("Restarted %d dead codes.", n_dead)
        return n_dead

    def get_codebook_entry(
        self, indices: torch.Tensor, shape: tuple[int, ...] | None
    ) -> torch.Tensor:
        """Indices -> code vectors; with shape (B, H, W, C) returned as [B, C, H, W]."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]
        return z_q
