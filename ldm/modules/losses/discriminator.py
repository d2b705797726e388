"""PatchGAN discriminator (Isola et al. 2017, pix2pix) as used by VQGAN/LDM, with optional ActNorm."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ActNorm", "NLayerDiscriminator", "weights_init"]


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + loc), data-initialized to zero mean, unit variance (Glow)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)  # [C, B*H*W]
        mean, std = flat.mean(1), flat.std(1)
        self.loc.data.copy_(-mean[None, :, None, None])
        self.scale.data.copy_(1.0 / (std[None, :, None, None] + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); batch-norm weights N(1, 0.02), biases 0."""
    name = m.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: n_layers stride-2 4x4 convs + norm + LeakyReLU(0.2), one logit per patch."""

    def __init__(
        self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False
    ) -> None:
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own affine shift
        kw, padw = 4, 1
        seq: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_prev, nf_mult = nf_mult, min(2**n, 8)
            seq += [
                nn.Conv2d(ndf * nf_prev, ndf * nf_mult, kw, stride=2, padding=padw, bias=use_bias),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        seq += [
            nn.Conv2d(ndf * nf_prev, ndf * nf_mult, kw, padding=padw, bias=use_bias),  # stride 1
            norm_layer(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * nf_mult, 1, kw, padding=padw),
        ]
        self.main = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> patch logits [B, 1, H', W']."""
        return self.main(x)
