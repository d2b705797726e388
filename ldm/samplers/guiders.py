"""Guiders: what the solver sees of a conditional network (Ho & Salimans 2022, arXiv 2207.12598).

A guider turns ``network(x, t, cond)`` plus the conditionings of one call into the ``model_fn(x, t)``
the solvers take. ``NoGuidance`` evaluates the condition only; ``ClassifierFreeGuidance`` mixes the
conditional and unconditional (empty or negative prompt) outputs, with the guidance rescale of
Lin et al. 2023 (arXiv 2305.08891, eq. 15-16); ``MultiGuidance`` is the extension point for a scale
per conditioning (e.g. separate text and image scales, InstructPix2Pix eq. 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.samplers.guidance import cat_cond, cfg_model_fn

Network = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Guider:
    """Base: ``model_fn(network, cond, uncond)`` -> the solver's model function."""

    needs_uncond = False

    def model_fn(self, network: Network, cond: Any, uncond: Any = None) -> ModelFn:
        raise NotImplementedError


class NoGuidance(Guider):
    """The conditional output alone."""

    def model_fn(self, network: Network, cond: Any, uncond: Any = None) -> ModelFn:
        return lambda x, t: network(x, t, cond)


@dataclass
class ClassifierFreeGuidance(Guider):
    """u + scale (c - u), one batched forward pass, optional guidance rescale phi."""

    scale: float
    rescale: float = 0.0
    batched: bool = True

    needs_uncond = True

    def model_fn(self, network: Network, cond: Any, uncond: Any = None) -> ModelFn:
        if uncond is None:
            raise ValueError(
                f"guidance scale {self.scale} needs an unconditional (or negative) conditioning"
            )
        return cfg_model_fn(network, cond, uncond, self.scale, self.rescale, self.batched)


@dataclass
class MultiGuidance(Guider):
    """u + sum_k s_k (c_k - c_{k-1}) over a chain of conditionings c_0 = u, c_1, ..., c_K = cond.

    ``conds`` gives the intermediate conditionings (e.g. image only, then image + text) and
    ``scales`` one scale per step of the chain; with one scale it is classifier-free guidance.
    """

    scales: Sequence[float]
    conds: Sequence[Any] = ()

    needs_uncond = True

    def model_fn(self, network: Network, cond: Any, uncond: Any = None) -> ModelFn:
        chain = [uncond, *self.conds, cond]
        if len(self.scales) != len(chain) - 1:
            raise ValueError(
                f"MultiGuidance: {len(self.scales)} scales for {len(chain) - 1} guidance steps"
            )

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            n = len(chain)
            batched = chain[0]
            for c in chain[1:]:
                batched = cat_cond(batched, c)
            outs = network(torch.cat([x] * n), torch.cat([t] * n), batched).chunk(n)
            out = outs[0]
            for k, s in enumerate(self.scales):
                out = out + s * (outs[k + 1] - outs[k])
            return out

        return fn


def guider_for(scale: float, rescale: float = 0.0) -> Guider:
    """Classifier-free guidance at ``scale``; scale 1 without rescale needs no unconditional pass."""
    if scale == 1.0 and rescale == 0.0:
        return NoGuidance()
    return ClassifierFreeGuidance(float(scale), float(rescale))
