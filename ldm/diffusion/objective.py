"""The training objective of a diffusion model, over the same denoiser the solvers use.

- Discrete VP models (Ho et al. 2020; Rombach et al. 2022 eq. 2): t ~ U{0..T-1},
  x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, L = l_simple_weight * mean(w_t ||F(x_t, t) - target||
  / e^logvar_t + logvar_t) + elbo_weight * L_vlb, with the target (eps, x0 or v) given by the
  ``DiscreteDenoiser``; w_t is Min-SNR-gamma / truncated-SNR weighting when asked.
- Sigma-conditioned models (EDM / VE, Karras et al. 2022 eq. 2): lambda(sigma) ||D(x + sigma n;
  sigma) - x||^2 through the ``SigmaDenoiser``'s preconditioning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm.diffusion import losses
from ldm.diffusion.denoiser import DiscreteDenoiser, SigmaDenoiser
from ldm.diffusion.gaussian import q_sample, snr

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # F(x_t, t) with the condition bound


@dataclass
class DiffusionLoss:
    """Loss options (CompVis names) and the loss of one batch for either kind of denoiser."""

    loss_type: str = "l2"
    l_simple_weight: float = 1.0
    original_elbo_weight: float = 0.0
    min_snr_gamma: float | None = None
    snr_weight_floor: float | None = None
    offset_noise: float = 0.0
    input_perturbation: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in losses.LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r}: expected one of {list(losses.LOSS_TYPES)}."
            )

    def discrete(
        self,
        network: Network,
        denoiser: DiscreteDenoiser,
        x_start: torch.Tensor,
        t: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        logvar: torch.Tensor,
        lvlb_weights: torch.Tensor,
        noise: torch.Tensor | None = None,
        prefix: str = "train",
        learn_logvar: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_simple (weighted, with learned log-variance) + L_vlb at timesteps t [B]."""
        noise = torch.randn_like(x_start) if noise is None else noise
        noise = losses.offset_noise(noise, self.offset_noise)
        x_noisy = q_sample(
            x_start, t, losses.perturb_noise(noise, self.input_perturbation), alphas_cumprod
        )
        model_output = network(x_noisy, t)
        target = denoiser.target(x_start, noise, t, alphas_cumprod)
        reduce_dims = list(range(1, x_start.ndim))
        loss_simple = losses.elementwise_loss(model_output, target, self.loss_type)
        loss_simple = loss_simple.mean(dim=reduce_dims)  # [B]
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}
        weighted = loss_simple
        if self.min_snr_gamma is not None or self.snr_weight_floor is not None:
            snr_t = snr(t, alphas_cumprod).to(loss_simple)
            weighted = loss_simple * losses.min_snr_weights(
                snr_t, self.min_snr_gamma, denoiser.parameterization, self.snr_weight_floor
            )
        logvar_t = logvar[t.to(logvar.device)].to(loss_simple)
        loss = weighted / torch.exp(logvar_t) + logvar_t
        if learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (lvlb_weights[t] * loss_simple).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def sigma(
        self,
        network: Network,
        denoiser: SigmaDenoiser,
        x_start: torch.Tensor,
        prefix: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """lambda(sigma) ||D(x_0 + sigma n; sigma) - x_0||^2 (EDM eq. 2)."""
        loss = denoiser.training.loss(network, x_start, loss_type=self.loss_type)  # [B]
        out = self.l_simple_weight * loss.mean()
        return out, {f"{prefix}/loss_simple": loss.mean(), f"{prefix}/loss": out}
