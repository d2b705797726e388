"""Autoencoder training losses; CompVis/taming target paths resolve here directly.

`ldm.modules.losses.LPIPSWithDiscriminator`, `ldm.modules.losses.contperceptual.LPIPSWithDiscriminator`
and `ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator` are the original config targets.
"""

from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.lpips import LPIPS, LPIPSWeightsMissing
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = [
    "LPIPS",
    "LPIPSWeightsMissing",
    "LPIPSWithDiscriminator",
    "NLayerDiscriminator",
    "VQLPIPSWithDiscriminator",
]
