"""Tiny deterministic LightningModule and data sets for the training command-line tests."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset


class ToyDataset(Dataset):
    """Linear regression pairs y = x . w, with a caption per item (CompVis-style dict items)."""

    def __init__(self, n: int = 32, dim: int = 4, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=gen)
        w = torch.linspace(-1.0, 1.0, dim)
        self.y = self.x @ w

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "index": i, "caption": f"item {i}"}


class ToyIterable(IterableDataset):
    """Streams the items of :class:`ToyDataset` in order."""

    def __init__(self, n: int = 8) -> None:
        self.data = ToyDataset(n)

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


class ToyModel(pl.LightningModule):
    """MLP regressor; its training noise uses the global RNG, its LR follows a LambdaLR warm-up."""

    def __init__(
        self, in_dim: int = 4, hidden: int = 8, noise: float = 0.05, monitor: str | None = None
    ):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.noise = noise
        self.learning_rate = 1e-3
        if monitor:
            self.monitor = monitor
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.extend(int(i) for i in batch["index"])
        x = batch["x"] + self.noise * torch.randn_like(batch["x"])
        loss = nn.functional.mse_loss(self(x), batch["y"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", nn.functional.mse_loss(self(batch["x"]), batch["y"]))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("test/loss", nn.functional.mse_loss(self(batch["x"]), batch["y"]))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    @torch.no_grad()
    def log_images(
        self, batch: dict[str, Any], split: str = "train", **kwargs: Any
    ) -> dict[str, Any]:
        """Inputs as 3x4x4 images in [-1, 1], plus random 'samples' (drawn from the global RNG)."""
        x = batch["x"]
        img = torch.tanh(x).repeat_interleave(4, dim=1).view(-1, 1, 4, 4).repeat(1, 3, 1, 1)
        return {"inputs": img, "samples": torch.rand_like(img) * 2 - 1}


class WeightDump(pl.Callback):
    """Writes each rank's final weights to ``<folder>/rank<r>.pt`` (DDP test)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import os

        os.makedirs(self.folder, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, f"{self.folder}/rank{trainer.global_rank}.pt")
        torch.save(
            list(getattr(pl_module, "seen", [])), f"{self.folder}/seen{trainer.global_rank}.pt"
        )


class KillAtStep(pl.Callback):
    """SIGKILLs its own process once ``global_step`` reaches ``step`` (resume test)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(pl.Callback):
    """Sends ``signame`` to its own process when ``global_step`` reaches ``step``."""

    def __init__(self, step: int, signame: str = "SIGUSR1") -> None:
        self.step, self.signame = step, signame

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signame))


class FailAtStep(pl.Callback):
    """Raises ``RuntimeError`` when ``global_step`` reaches ``step`` (exception-saves test)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"planned failure at step {trainer.global_step}")


class RankImageLogger(pl.Callback):
    """Wraps ldm.callbacks.ImageLogger and records which ranks wrote images (DDP test)."""

    def __init__(self, folder: str, **kwargs: Any) -> None:
        from ldm.callbacks import ImageLogger

        self.folder = folder
        self.inner = ImageLogger(**kwargs)
        parent = self

        def log_local(*a: Any, **k: Any) -> None:
            import os

            os.makedirs(parent.folder, exist_ok=True)
            open(f"{parent.folder}/images_rank{parent.rank}", "a").close()
            ImageLogger.log_local(parent.inner, *a, **k)

        self.inner.log_local = log_local
        self.rank = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rank = trainer.global_rank
        self.inner.on_train_batch_end(trainer, *args)


class ToyImages(Dataset):
    """Smooth random H x W x 3 images in [-1, 1] with captions (CompVis items for a tiny LDM)."""

    def __init__(self, n: int = 16, size: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        low = torch.rand(n, 3, 2, 2, generator=gen) * 2 - 1
        self.images = nn.functional.interpolate(low, size=(size, size), mode="bilinear").permute(
            0, 2, 3, 1
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "caption": f"image {i}"}
