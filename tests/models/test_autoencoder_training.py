"""Training glue of the first stages: manual optimization, disc_start, accumulation, VQ gradients."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.data.photos import PhotoCrops
from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel, VQModelInterface

DD = dict(
    double_z=True,
    z_channels=3,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def _kl(disc_start: int = 0, **kw) -> AutoencoderKL:
    loss = {
        "target": "ldm.modules.losses.LPIPSWithDiscriminator",
        "params": {
            "disc_start": disc_start,
            "perceptual_weight": 0.0,
            "kl_weight": 1e-6,
            "disc_num_layers": 2,
        },
    }
    return AutoencoderKL(DD, loss, embed_dim=3, learning_rate=1e-3, **kw)


def _vq(disc_start: int = 0, **kw) -> VQModel:
    loss = {
        "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "params": {"disc_start": disc_start, "perceptual_weight": 0.0, "disc_num_layers": 2},
    }
    return VQModel(
        {**DD, "double_z": False}, loss, n_embed=16, embed_dim=3, learning_rate=1e-3, **kw
    )


def _loader(n: int = 4, bs: int = 2) -> DataLoader:
    return DataLoader(PhotoCrops(size=32, length=n, deterministic=True), batch_size=bs)


def _fit(model: pl.LightningModule, batches: int, bs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _loader(batches * bs, bs))
    return trainer


def _changed(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_one_step_updates_both_optimizers() -> None:
    model = _kl(disc_start=0)
    before = copy.deepcopy(model)
    trainer = _fit(model, batches=1)
    assert _changed(model.encoder, before.encoder) and _changed(model.decoder, before.decoder)
    assert _changed(model.loss.discriminator, before.loss.discriminator)
    assert model.generator_step == 1
    assert trainer.global_step == 2  # Lightning counts both optimizer steps
    assert torch.equal(model.loss.logvar, before.loss.logvar)  # not trained without learn_logvar


def test_discriminator_untouched_before_disc_start() -> None:
    model = _kl(disc_start=1000)
    before = copy.deepcopy(model)
    _fit(model, batches=1)
    assert _changed(model.decoder, before.decoder)
    for (name, p), q in zip(
        model.loss.discriminator.state_dict().items(),
        before.loss.discriminator.state_dict().values(),
    ):
        assert torch.equal(p, q), name
    assert model.generator_step == 1


class _RecordSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(pl_module.generator_step)


def test_gradient_accumulation_steps_every_n_batches() -> None:
    model = _kl(disc_start=0, accumulate_grad_batches=2)
    before = copy.deepcopy(model)
    rec = _RecordSteps()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=[rec],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _loader(6, 2))
    assert rec.steps == [0, 1, 2]  # step after batches 2 and 3 (the epoch's last batch flushes)
    assert trainer.global_step == 4  # generator + discriminator, twice
    assert _changed(model.decoder, before.decoder)


def test_learn_logvar_trains_the_log_variance() -> None:
    model = _kl(disc_start=1000, learn_logvar=True)
    _fit(model, batches=1)
    assert model.loss.logvar.item() != 0.0


def test_vq_straight_through_gradient_reaches_the_encoder() -> None:
    model = _vq()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    xrec, qloss = model(x)
    ((xrec - x) ** 2).mean().backward()  # reconstruction only: no codebook/commitment path
    g = model.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # the codebook sees no decoder gradient


def test_vq_training_step_updates_both_and_logs_code_statistics() -> None:
    model = _vq(disc_start=0, restart_dead_codes=True)
    before = copy.deepcopy(model)
    trainer = _fit(model, batches=1)
    assert _changed(model.encoder, before.encoder)
    assert _changed(model.loss.discriminator, before.loss.discriminator)
    logged = trainer.callback_metrics
    assert {"train/perplexity", "train/code_usage", "train/quant_loss"} <= set(logged)
    assert 1.0 <= float(logged["train/perplexity"]) <= 16.0


def _skimage_metrics(x: torch.Tensor, xrec: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR and SSIM of scikit-image (data range 2, 7x7 window, channels first)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = x.double().numpy(), xrec.double().clamp(-1, 1).numpy()
    p = [peak_signal_noise_ratio(u, v, data_range=2.0) for u, v in zip(a, b)]
    s = [structural_similarity(u, v, data_range=2.0, channel_axis=0) for u, v in zip(a, b)]
    return p, s


def test_validation_metrics_and_image_logs() -> None:
    torch.manual_seed(0)
    model = _kl(disc_start=1000)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.validate(model, _loader(4, 2), verbose=False)[0]
    assert {"val/rec_loss", "val/psnr", "val/ssim", "val/rec_l1"} <= set(metrics)
    # the epoch values: scikit-image's PSNR / SSIM and the L1 of the posterior-mode reconstruction
    model.eval()
    p, s, l1 = [], [], []
    with torch.no_grad():
        for batch in _loader(4, 2):
            x = batch["image"].permute(0, 3, 1, 2).float()  # [B, H, W, 3] -> [B, 3, H, W]
            xrec = model.decode(model.encode(x).mode())
            bp, bs = _skimage_metrics(x, xrec)
            p, s = p + bp, s + bs
            l1.append((x - xrec.clamp(-1, 1)).abs().mean().item())
    assert metrics["val/psnr"] == pytest.approx(sum(p) / len(p), rel=1e-4)
    assert metrics["val/ssim"] == pytest.approx(sum(s) / len(s), rel=1e-4, abs=1e-6)
    assert metrics["val/rec_l1"] == pytest.approx(sum(l1) / len(l1), rel=1e-4)
    # image logs: the inputs themselves, D(z) of a posterior sample z = mean + std * eps, and D(z)
    # of a prior draw z ~ N(0, I) (the draws in order: eps, an unused posterior sample, the prior)
    batch = next(iter(_loader(4, 4)))
    x = batch["image"].permute(0, 3, 1, 2).float()[:3].contiguous()
    torch.manual_seed(1)
    logs = model.log_images(batch, N=3)
    assert set(logs) == {"inputs", "reconstructions", "samples"}
    torch.manual_seed(1)
    with torch.no_grad():
        post = model.encode(x)
        z_post = post.mean + post.std * torch.randn_like(post.mean)
        torch.randn_like(post.mean)
        z_prior = torch.randn_like(post.mean)
        torch.testing.assert_close(logs["inputs"], x)
        torch.testing.assert_close(logs["reconstructions"], model.decode(z_post))
        torch.testing.assert_close(logs["samples"], model.decode(z_prior))
    vq = _vq().eval()
    vq_logs = vq.log_images(batch, N=2)
    assert set(vq_logs) == {"inputs", "reconstructions"}
    with torch.no_grad():
        torch.testing.assert_close(vq_logs["reconstructions"], vq(x[:2])[0])


def test_inference_config_with_identity_loss(tmp_path) -> None:
    model = AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=3)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model.decode(model.encode(x).mode()).shape == x.shape
    with pytest.raises(RuntimeError, match="inference config"):
        _fit(model, batches=1)
    # checkpoint round trip through ckpt_path (safe loading) restores the exact weights
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ae.ckpt")
    again = AutoencoderKL(
        DD, {"target": "torch.nn.Identity"}, embed_dim=3, ckpt_path=str(tmp_path / "ae.ckpt")
    )
    torch.testing.assert_close(again.encode(x).mean, model.encode(x).mean)


def test_vq_interface_and_identity_first_stage() -> None:
    kw = dict(
        ddconfig={**DD, "double_z": False}, lossconfig={"target": "torch.nn.Identity"}, n_embed=16
    )
    vq = VQModelInterface(embed_dim=3, **kw).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = vq.encode(x)
    assert h.shape == (2, 3, 16, 16)
    torch.testing.assert_close(vq.decode(h), vq(x)[0])
    assert not torch.allclose(vq.decode(h, force_not_quantize=True), vq.decode(h))
    ident = IdentityFirstStage(vq_interface=True)
    assert ident.encode(x) is x and ident.decode(x) is x and ident.quantize(x)[0] is x


def test_bf16_mixed_precision_step_updates_both_optimizers() -> None:
    model = _kl(disc_start=0)
    before = copy.deepcopy(model)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _loader(2, 2))
    assert _changed(model.decoder, before.decoder)
    assert _changed(model.loss.discriminator, before.loss.discriminator)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _CheckReplicas(pl.Callback):
    """After training, every rank must hold the same weights and codebook (DDP + dead-code restart)."""

    def on_train_end(self, trainer, pl_module) -> None:
        # parameters and the codebook state; BatchNorm running statistics of the discriminator are
        # per-rank as in any DDP run without sync_batchnorm=True
        state = {
            k: v
            for k, v in pl_module.state_dict().items()
            if "running_" not in k and "num_batches" not in k
        }
        flat = torch.cat([t.detach().float().flatten() for t in state.values()])
        gathered = pl_module.all_gather(flat)  # [world, N]
        assert gathered.shape[0] == 2
        torch.testing.assert_close(gathered[0], gathered[1])
        assert pl_module.generator_step == 2


@pytest.mark.slow
def test_ddp_two_processes_keep_replicas_identical(tmp_path) -> None:
    from pytorch_lightning.strategies import DDPStrategy

    model = _vq(disc_start=0, restart_dead_codes=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True),
        callbacks=[_CheckReplicas()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _loader(8, 2))
    trainer.save_checkpoint(tmp_path / "ddp.ckpt")
    assert (tmp_path / "ddp.ckpt").is_file()
