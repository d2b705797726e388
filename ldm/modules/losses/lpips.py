"""LPIPS perceptual distance (Zhang et al. 2018, Eq. 1) on VGG16 features, from local weight files only.

Key names equal taming's / the `lpips` package's (`net.slice{1..5}.*`, `lin{0..4}.model.1.weight`,
`scaling_layer.*`) so `loss.perceptual_loss.*` entries of CompVis checkpoints load unchanged.
Nothing is ever downloaded: the VGG16 trunk comes from torchvision's `vgg16-397923af.pth` and the
linear heads from the `lpips` package's `weights/v0.1/vgg.pth`, found by argument, environment
variable or default location (see :func:`find_vgg16_weights`, :func:`find_lpips_heads`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["LPIPS", "LPIPSWeightsMissing", "find_lpips_heads", "find_vgg16_weights"]

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_HEADS_FILE = "vgg.pth"
LPIPS_HEADS_URL = (
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
)
ENV_VGG16 = "LDM_VGG16_WEIGHTS"
ENV_LPIPS = "LDM_LPIPS_WEIGHTS"

# torchvision vgg16 `features` layout: (out_channels | "M" for max-pool); indices match its keys
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_SLICES = (
    (0, 4),
    (4, 9),
    (9, 16),
    (16, 23),
    (23, 30),
)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


class LPIPSWeightsMissing(FileNotFoundError):
    """A weight file LPIPS needs is not on disk; the message says which file and where to get it."""


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_vgg16_weights(path: str | os.PathLike | None = None) -> Path:
    """Locate torchvision's VGG16 ImageNet weights: argument, $LDM_VGG16_WEIGHTS, torch hub cache."""
    candidates = [path, os.environ.get(ENV_VGG16), _hub_checkpoints() / VGG16_FILE]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise LPIPSWeightsMissing(
        f"LPIPS needs torchvision's VGG16 weights '{VGG16_FILE}' (528 MB) and will not download them. "
        f"Download {VGG16_URL} and put it at {_hub_checkpoints() / VGG16_FILE}, or pass "
        f"`vgg_weights: /path/{VGG16_FILE}` (lossconfig params) or set ${ENV_VGG16}. "
        "Or train without the perceptual loss: `perceptual_weight: 0` in the lossconfig."
    )


def _lpips_package_heads() -> Path | None:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / LPIPS_HEADS_FILE


def find_lpips_heads(path: str | os.PathLike | None = None) -> Path:
    """Locate the LPIPS linear heads: argument, $LDM_LPIPS_WEIGHTS, hub cache, the `lpips` package."""
    candidates = [
        path,
        os.environ.get(ENV_LPIPS),
        _hub_checkpoints() / "lpips_vgg_v0.1.pth",
        _lpips_package_heads(),
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise LPIPSWeightsMissing(
        f"LPIPS needs its linear-head weights '{LPIPS_HEADS_FILE}' (v0.1, VGG; 7 KB) and will not "
        f"download them. `pip install lpips` ships them, or download {LPIPS_HEADS_URL} and put it "
        f"at {_hub_checkpoints() / 'lpips_vgg_v0.1.pth'}, or pass `lpips_weights: /path/vgg.pth` or "
        f"set ${ENV_LPIPS}. Or train without the perceptual loss: `perceptual_weight: 0`."
    )


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the VGG input normalization used by LPIPS."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """VGG16 conv trunk (Simonyan & Zisserman 2015) cut into the five LPIPS slices."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2))  # stride = kernel size
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        for k, (a, b) in enumerate(_SLICES, start=1):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", s)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> five feature maps (relu1_2 ... relu5_3)."""
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats

    def load_torchvision(self, state: dict[str, torch.Tensor]) -> None:
        """Load torchvision `vgg16` state (`features.{i}.*`) into the slices."""
        mapped = {}
        for k, (a, b) in enumerate(_SLICES, start=1):
            for i in range(a, b):
                for p in ("weight", "bias"):
                    src = f"features.{i}.{p}"
                    if src in state:
                        mapped[f"slice{k}.{i}.{p}"] = state[src]
        missing, _ = self.load_state_dict(mapped, strict=False)
        if missing:
            raise ValueError(
                f"VGG16 weight file lacks {len(missing)} feature tensors (e.g. {missing[0]}); "
                f"expected torchvision's '{VGG16_FILE}' with keys 'features.N.weight'."
            )


class NetLinLayer(nn.Module):
    """1x1 conv head w_l of LPIPS (non-negative learned channel weights), dropout in front."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalize features along channels."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """d(x, x0) = sum_l mean_hw || w_l * (f_l(x) - f_l(x0)) ||^2 over unit-normalized VGG features.

    Inputs are [B, 3, H, W] in [-1, 1]; output [B, 1, 1, 1]. Frozen (requires_grad False).
    Weights come from local files when they exist (loaded at construction, except on the meta
    device) or from a checkpoint that holds `perceptual_loss.*`; building never fails offline,
    but running without weights raises :class:`LPIPSWeightsMissing` naming the file to provide.
    """

    def __init__(
        self,
        use_dropout: bool = True,
        vgg_weights: str | os.PathLike | None = None,
        lpips_weights: str | os.PathLike | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for i, c in enumerate(CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(c, use_dropout=use_dropout))
        self.vgg_weights, self.lpips_weights = vgg_weights, lpips_weights
        self.weights_loaded = False
        self._missing: LPIPSWeightsMissing | None = None
        if load_weights and not self.lin0.model[-1].weight.is_meta:
            try:
                self.load_pretrained(vgg_weights, lpips_weights)
            except LPIPSWeightsMissing as err:
                self._missing = err
                logger.warning(
                    "LPIPS built without weights; it cannot run until they are loaded. %s", err
                )
        self.requires_grad_(False)
        self.eval()

    def load_pretrained(
        self,
        vgg_weights: str | os.PathLike | None = None,
        lpips_weights: str | os.PathLike | None = None,
    ) -> None:
        """Load VGG16 trunk and linear heads from local files (never downloads)."""
        vgg_path, heads_path = find_vgg16_weights(vgg_weights), find_lpips_heads(lpips_weights)
        self.net.load_torchvision(torch.load(vgg_path, map_location="cpu", weights_only=True))
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)
        for i in range(len(CHANNELS)):
            key = f"lin{i}.model.1.weight"
            if key not in heads:
                raise ValueError(
                    f"{heads_path}: no '{key}'; expected the lpips v0.1 VGG heads file."
                )
            getattr(self, f"lin{i}").model[-1].weight.data.copy_(heads[key])
        self.weights_loaded = True
        logger.info("LPIPS loaded VGG16 from %s and heads from %s", vgg_path, heads_path)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if (
            f"{prefix}lin0.model.1.weight" in state_dict
            and f"{prefix}net.slice1.0.weight" in state_dict
        ):
            self.weights_loaded = (
                True  # a checkpoint (e.g. CompVis first_stage_model.loss.*) holds them
            )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] x2 in [-1, 1] -> distance [B, 1, 1, 1]."""
        if not self.weights_loaded:
            if self._missing is None:  # built on meta or with load_weights=False: try the files now
                self.load_pretrained(self.vgg_weights, self.lpips_weights)
            else:
                raise self._missing
        f0 = self.net(self.scaling_layer(input))
        f1 = self.net(self.scaling_layer(target))
        val = 0.0
        for i in range(len(CHANNELS)):
            diff = (_normalize(f0[i]) - _normalize(f1[i])).pow(2)  # [B, C_l, H_l, W_l]
            val = val + getattr(self, f"lin{i}")(diff).mean(dim=[2, 3], keepdim=True)
        return val
