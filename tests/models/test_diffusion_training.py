"""A tiny LatentDiffusion (IdentityFirstStage + MLP denoiser, ~23k parameters) learns a two-cluster
distribution on CPU: the loss falls and EMA samples reproduce the data statistics."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.util import instantiate_from_config


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def two_clusters(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 1, 1, 2] (B x H x W x C): x ~ +-1 + N(0, 0.1^2), y ~ N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    a = sign + 0.1 * torch.randn(n, generator=g)
    b = 0.3 * torch.randn(n, generator=g)
    return torch.stack([a, b], -1).view(n, 1, 1, 2)


def tiny_config(**overrides):
    params = {
        "first_stage_config": {"target": "ldm.models.autoencoder.IdentityFirstStage"},
        "cond_stage_config": "__is_unconditional__",
        "first_stage_key": "image",
        "image_size": 1,
        "channels": 2,
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "monitor": "val/loss_simple_ema",
        "unet_config": {
            "target": "toy_denoiser.ToyDenoiser",
            "params": {"in_channels": 2, "width": 64, "depth": 2},
        },
    }
    params.update(overrides)
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}


def train_by_hooks(model, data, steps, batch_size=256, lr=3e-3):
    """What Lightning calls per step: training_step, backward, optimizer + scheduler, EMA hook."""
    model.learning_rate = lr
    opt = model.configure_optimizers()
    g = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for i in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        loss = model.training_step({"image": data[idx]}, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_train_batch_end(None, None, i)
        losses.append(loss.item())
    return losses


def test_tiny_ldm_learns_two_clusters(one_thread):
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config())
    assert sum(p.numel() for p in model.model.parameters()) < 30_000
    losses = train_by_hooks(model, two_clusters(4096), steps=300)
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.6 * first, (first, last)
    assert int(model.model_ema.num_updates) == 300
    model.eval()
    with model.ema_scope():
        z, _ = model.sample_log(None, 2000, ddim=True, ddim_steps=50)
    x = z.view(-1, 2)
    assert abs((x[:, 0] > 0).float().mean().item() - 0.5) < 0.08
    assert abs(x[:, 0].abs().mean().item() - 1.0) < 0.1
    assert abs(x[:, 1].std().item() - 0.3) < 0.06
    assert abs(x[:, 1].mean().item()) < 0.06


class _Toy(Dataset):
    def __init__(self, n):
        self.x = two_clusters(n)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def test_trainer_fit_logs_ema_validation_and_steps_the_scheduler(tmp_path, one_thread):
    torch.manual_seed(0)
    scheduler = {
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {
            "warm_up_steps": [4],
            "cycle_lengths": [10**9],
            "f_start": [0.0],
            "f_max": [1.0],
            "f_min": [1.0],
        },
    }
    model = instantiate_from_config(tiny_config(scheduler_config=scheduler))
    model.learning_rate = 1e-3
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    loader = DataLoader(_Toy(48), batch_size=16)  # 3 batches: one epoch, then validation
    trainer.fit(model, loader, loader)
    metrics = trainer.callback_metrics
    assert {"val/loss_simple", "val/loss_simple_ema", "train/loss_simple_epoch"} <= set(metrics)
    # EMA weights differ from the trained ones, so the two validation losses differ
    assert float(metrics["val/loss_simple"]) != float(metrics["val/loss_simple_ema"])
    assert int(model.model_ema.num_updates) == 3
    # LambdaLR stepped per optimizer step: after 3 steps f = 3/4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.75e-3)
