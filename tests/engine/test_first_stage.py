"""The first stage's latent scaling (LDM Sec. 3, App. G): z = s E(x), x = D(z / s), scale_by_std."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.engine.first_stage import FirstStageMixin
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError


class _Linear(nn.Module):
    """E(x) = a posterior with mean 2 x and log-variance 0 (std 1); D(z) = 3 z."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(torch.cat([2 * x * self.w, torch.zeros_like(x)], 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return 3 * z * self.w


class _VQLike(_Linear):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        return 3 * z + (100.0 if force_not_quantize else 0.0)


class _Engine(FirstStageMixin):
    def __init__(self, fs: nn.Module | None, scale: float, scale_by_std: bool = False) -> None:
        self.first_stage_model = fs
        self.scale_factor = torch.tensor(scale)
        self.scale_by_std = scale_by_std
        self.current_epoch = self.global_step = 0
        self.restarted_from_ckpt = False
        self.first_stage_key = "image"
        self.device = torch.device("cpu")

    def image_input(self, batch: dict, key: str) -> torch.Tensor:
        return batch[key].permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]


def test_encode_scales_the_posterior_sample_and_decode_divides() -> None:
    engine = _Engine(_Linear(), 0.5)
    x = torch.randn(2, 1, 3, 3)
    g = torch.Generator().manual_seed(4)
    z = engine.encode_latent(x, generator=g)
    eps = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(z, 0.5 * (2 * x + eps))  # s (mu + sigma eps), sigma = 1
    torch.testing.assert_close(engine.decode_latent(z), 3 * z / 0.5)  # D(z / s)
    # without a generator: s * (a posterior sample) from the global RNG
    torch.manual_seed(9)
    z = engine.get_first_stage_encoding(engine.encode_first_stage(x))
    torch.manual_seed(9)
    torch.testing.assert_close(z, 0.5 * (2 * x + torch.randn(2, 1, 3, 3)))


def test_tensor_latents_and_pixel_space() -> None:
    engine = _Engine(_VQLike(), 0.25)
    x = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(engine.encode_latent(x, generator=torch.Generator()), 0.25 * 2 * x)
    z = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(engine.decode_first_stage(z), 3 * z / 0.25)
    torch.testing.assert_close(
        engine.decode_first_stage(z, force_not_quantize=True), 3 * z / 0.25 + 100
    )
    pixel = _Engine(None, 0.25)
    assert pixel.encode_latent(x) is x and pixel.decode_latent(z) is z
    with pytest.raises(NotImplementedError):
        engine.decode_first_stage(z, predict_cids=True)
    with pytest.raises(TypeError, match="neither a tensor nor a distribution"):
        engine.get_first_stage_encoding([1, 2])


def test_scale_by_std_sets_one_over_the_std_of_the_first_batch_latents() -> None:
    engine = _Engine(_VQLike(), 1.0, scale_by_std=True)
    x = torch.randn(4, 5, 5, 1)
    engine.on_train_batch_start({"image": x}, 0)
    expect = 1.0 / (2 * x).flatten().std()  # the unbiased std of z = E(x) over all entries
    torch.testing.assert_close(engine.scale_factor, expect)
    # only on the very first batch of a fresh run
    engine.on_train_batch_start({"image": 5 * x}, 1)
    torch.testing.assert_close(engine.scale_factor, expect)
    for attr, value in (("global_step", 1), ("current_epoch", 1), ("restarted_from_ckpt", True)):
        other = _Engine(_VQLike(), 1.0, scale_by_std=True)
        setattr(other, attr, value)
        other.on_train_batch_start({"image": x}, 0)
        assert float(other.scale_factor) == 1.0
    off = _Engine(_VQLike(), 1.0, scale_by_std=False)
    off.on_train_batch_start({"image": x}, 0)
    assert float(off.scale_factor) == 1.0
    with pytest.raises(ConfigError, match="set scale_factor: 1.0"):
        _Engine(_VQLike(), 0.18215, scale_by_std=True).on_train_batch_start({"image": x}, 0)


def test_scale_by_std_from_cached_latents_and_broadcast_from_rank_zero() -> None:
    from types import SimpleNamespace

    from ldm.engine.latent_caching import MOMENTS_KEY

    engine = _Engine(_VQLike(), 1.0, scale_by_std=True)
    cached = torch.randn(3, 4, 2, 2)  # stored latents (no embed_dim: used as they are)
    engine.on_train_batch_start({MOMENTS_KEY: cached}, 0)
    torch.testing.assert_close(engine.scale_factor, 1.0 / cached.flatten().std())

    sent: list[tuple[torch.Tensor, int]] = []

    def broadcast(value: torch.Tensor, src: int) -> torch.Tensor:
        sent.append((value, src))
        return torch.tensor(0.125)  # what rank 0 measured

    for world, expect in ((2, 0.125), (1, None)):
        engine = _Engine(_VQLike(), 1.0, scale_by_std=True)
        engine._trainer = SimpleNamespace(
            world_size=world, strategy=SimpleNamespace(broadcast=broadcast)
        )
        engine.on_train_batch_start({MOMENTS_KEY: cached}, 0)
        if expect is None:
            torch.testing.assert_close(engine.scale_factor, 1.0 / cached.flatten().std())
        else:
            assert float(engine.scale_factor) == expect
    assert len(sent) == 1 and sent[0][1] == 0
    torch.testing.assert_close(sent[0][0], 1.0 / cached.flatten().std())


def test_latent_and_scale_keep_their_dtypes() -> None:
    engine = _Engine(_Linear().to(torch.bfloat16), 0.5)
    x = torch.randn(1, 1, 2, 2)
    z = engine.encode_latent(x, generator=torch.Generator().manual_seed(0))
    assert z.dtype == torch.bfloat16  # the noise follows the posterior's dtype
    engine = _Engine(_VQLike(), 1.0, scale_by_std=True)
    engine.scale_factor = torch.tensor(1.0, dtype=torch.float64)  # a float64 buffer stays float64
    engine.on_train_batch_start({"image": torch.randn(2, 3, 3, 1)}, 0)
    assert engine.scale_factor.dtype == torch.float64
