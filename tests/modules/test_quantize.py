"""VectorQuantizer: nearest code, straight-through gradient, losses, EMA codebook, dead-code restart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.modules.quantize import VectorQuantizer, codebook_perplexity, codebook_usage


def test_nearest_code_loss_and_straight_through() -> None:
    vq = VectorQuantizer(16, 3, beta=0.25)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    zq, loss, (perp, _, ind) = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    ref_ind = torch.cdist(flat, vq.embedding.weight.detach()).argmin(1)
    assert torch.equal(ind, ref_ind)
    codes = vq.embedding.weight.detach()[ref_ind].reshape(2, 4, 5, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(zq, codes)
    mse = ((codes - z.detach()) ** 2).mean()
    torch.testing.assert_close(loss, mse * 1.25)  # commitment + beta * codebook (legacy order)
    # straight-through: d zq / d z is the identity
    (zq * torch.arange(zq.numel()).reshape(zq.shape)).sum().backward()
    torch.testing.assert_close(
        z.grad, torch.arange(zq.numel(), dtype=torch.float).reshape(zq.shape)
    )
    assert 1.0 <= perp <= 16.0


def test_non_legacy_loss_order_puts_beta_on_commitment() -> None:
    vq = VectorQuantizer(8, 2, beta=0.25, legacy=False)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    zq, loss, _ = vq(z)
    loss.backward()
    # codebook term has weight 1 -> its gradient flows to the embedding with weight 1
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0
    diff = (zq.detach() - z.detach()).pow(2).mean()
    torch.testing.assert_close(loss, 1.25 * diff)


@pytest.mark.parametrize("legacy", [True, False])
def test_loss_gradients_put_beta_on_the_right_term(legacy: bool) -> None:
    """VQ-VAE (van den Oord et al. 2017, Eq. 3): codebook term ||sg(z) - e||^2 moves only the
    codes, commitment term ||z - sg(e)||^2 only the encoder output. taming's legacy order weighs
    them (beta, 1), the paper's order (1, beta); the loss value is the same, the gradients not."""
    beta = 0.25
    w_codebook, w_commit = (beta, 1.0) if legacy else (1.0, beta)
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, beta=beta, legacy=legacy)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    _, loss, (_, _, ind) = vq(z)
    loss.backward()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)  # [9, 2]
    codes = vq.embedding.weight.detach()
    n = flat.numel()
    # d/dz of w_commit * mean((z - e)^2) = w_commit * 2 (z - e) / n
    grad_z = w_commit * 2 * (flat - codes[ind]) / n
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 2), grad_z)
    # d/de_k of w_codebook * mean((e - z)^2) = w_codebook * sum_{i -> k} 2 (e_k - z_i) / n
    grad_e = torch.zeros_like(codes)
    grad_e.index_add_(0, ind, w_codebook * 2 * (codes[ind] - flat) / n)
    torch.testing.assert_close(vq.embedding.weight.grad, grad_e)


def test_perplexity_and_usage() -> None:
    ind = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(codebook_perplexity(ind, 8), torch.tensor(4.0))
    torch.testing.assert_close(codebook_usage(ind, 8), torch.tensor(0.5))
    torch.testing.assert_close(
        codebook_perplexity(torch.zeros(10, dtype=torch.long), 8), torch.tensor(1.0)
    )


def test_ema_codebook_moves_codes_to_assigned_means() -> None:
    vq = VectorQuantizer(4, 2, ema=True, decay=0.5).train()
    assert not vq.embedding.weight.requires_grad
    z = torch.randn(1, 2, 8, 8) + 3.0
    for _ in range(30):
        _, loss, (_, _, ind) = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in ind.unique():
        target = flat[ind == code].mean(0)
        torch.testing.assert_close(vq.embedding.weight[code], target, atol=1e-3, rtol=1e-3)
    assert {"ema_cluster_size", "ema_embed_sum"} <= set(vq.state_dict())


def test_dead_codes_are_restarted_from_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(
        32, 2, restart_dead_codes=True, dead_code_threshold=0.5, usage_decay=0.5
    ).train()
    with torch.no_grad():
        vq.embedding.weight.mul_(0.0).add_(100.0)  # all codes far away ...
        vq.embedding.weight[0] = 0.0  # ... except code 0, which takes every vector
    z = torch.randn(4, 2, 8, 8)
    _, _, (_, _, ind0) = vq(z)
    assert ind0.unique().tolist() == [0]
    for _ in range(3):
        vq(z)
    # the dead codes now sit on encoder outputs and get used
    _, _, (_, _, ind) = vq(z)
    assert ind.unique().numel() > 8
    assert (vq.embedding.weight.abs() < 10).all()


def test_plain_quantizer_has_only_the_checkpoint_key() -> None:
    assert list(VectorQuantizer(8, 3).state_dict()) == ["embedding.weight"]


def test_remap_round_trip(tmp_path) -> None:
    used = np.array([1, 3, 5, 7])
    np.save(tmp_path / "used.npy", used)
    vq = VectorQuantizer(
        8, 2, remap=str(tmp_path / "used.npy"), unknown_index="extra", sane_index_shape=True
    )
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.arange(16, dtype=torch.float).reshape(8, 2))
    z = vq.embedding.weight[torch.tensor([3, 5, 7, 1])].T.reshape(1, 2, 2, 2).detach()
    _, _, (_, _, ind) = vq(z)
    assert ind.flatten().tolist() == [1, 2, 3, 0]  # positions in `used`
    back = vq.get_codebook_entry(ind.reshape(1, -1), (1, 2, 2, 2))
    torch.testing.assert_close(back, z)
