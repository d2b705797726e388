"""DreamBooth prior preservation (Ruiz et al. 2023, Sec. 3.3): class images made by the model itself.

``generate_class_images`` makes the missing class images of a ``DreamBoothDataset`` with
``model.generate``; ``DreamBoothClassImages`` is the Lightning callback that does it at the start
of fit. Image i starts from noise drawn from its own generator, seeded by (seed, i), and is made
in the batch ``[B * (i // B), B * (i // B + 1))`` (B = ``batch_size``) with the prompts of that
batch: a missing image is remade with its whole batch (only the missing files are written), so a
resumed or repaired folder is bit-identical to one made in a single run (batched float math can
differ in the last bits with the batch's composition, which would otherwise show in 8-bit PNGs).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from PIL.PngImagePlugin import PngInfo
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ldm.data.class_images import write_atomic
from ldm.data.datamodule import WrappedDataset
from ldm.data.dreambooth import DreamBoothDataset

logger = logging.getLogger(__name__)

SAMPLES_PER_TENSOR = 256  # weight values hashed per tensor by model_fingerprint


def model_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """{fingerprint, source}: sha256 of the names, shapes, dtypes and a strided value sample of
    the weights the model samples with: its EMA swapped in, the EMA buffers and any adapter layers
    (peft's ``lora_*``, zero at the start) left out, wrapped names unwrapped; so a model and the
    same model set up for LoRA training share one fingerprint."""
    h = hashlib.sha256()
    scope = model.ema_scope() if hasattr(model, "ema_scope") else contextlib.nullcontext()
    with scope:
        weights = sorted(
            (name.replace(".base_layer.", "."), t)
            for name, t in model.state_dict().items()
            if not name.startswith("model_ema.") and ".lora_" not in name
        )
        for name, t in weights:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.float64)  # exact, any dtype
            h.update(sample.numpy().tobytes())
    return {"fingerprint": h.hexdigest()[:16], "source": f"weights of {type(model).__name__}"}


def output_size(model: Any) -> tuple[int, int]:
    """(height, width) in pixels of the images ``model.generate`` makes by default."""
    from ldm.engine.generate import latent_factor

    _, h, w = model.latent_shape()
    f = latent_factor(model)
    return (h * f, w * f)


def index_generator(seed: int, i: int) -> torch.Generator:
    """CPU generator of class image i: a function of (seed, i) only."""
    mixed = hashlib.sha256(f"dreambooth:{int(seed)}:{int(i)}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(mixed[:8], "little") >> 1)


def start_noise(model: Any, seed: int, indices: range) -> torch.Tensor:
    """x_T [len(indices), C, h, w]: row k drawn from the generator of image indices[k]."""
    shape = model.latent_shape()
    return torch.stack([torch.randn(shape, generator=index_generator(seed, i)) for i in indices])


def _png(image: torch.Tensor, prompt: str, index: int) -> bytes:
    """8-bit PNG bytes of a [3, H, W] image in [0, 1], with its prompt in a text chunk."""
    from ldm.engine.decode import to_pil

    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("class_index", str(index))
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@torch.no_grad()
def generate_class_images(
    model: Any,
    dataset: DreamBoothDataset,
    batch_size: int = 16,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    use_ema: bool = True,
    negative_prompt: str | None = None,
    fingerprint: str | None = None,
    progress: bool = True,
) -> int:
    """Make the missing class images of ``dataset`` into its class_dir; the number made.

    Refuses (``ClassImageMismatch``) a folder made for other prompts, another size or another
    model unless the data set has ``regenerate: true``. ``fingerprint``: a fixed model identity
    (e.g. the checkpoint's ``file_hash``) instead of the digest of the weights."""
    cache = dataset.cache
    if cache is None:
        return 0
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    model_id = (
        {"fingerprint": fingerprint, "source": "given"} if fingerprint else model_fingerprint(model)
    )
    size = output_size(model)
    dataset.refresh()  # prompts against the manifest, as another process may have written it
    cache.check_model(model_id["fingerprint"], size)
    if cache.stale:
        cache.reset()
    missing = dataset.missing_class_images()
    sampling = {
        "sampler": sampler,
        "steps": int(steps),
        "guidance_scale": float(guidance_scale),
        "seed": int(seed),
        "use_ema": bool(use_ema),
        "negative_prompt": negative_prompt,
        "batch_size": int(batch_size),
    }
    before = (cache.read_manifest() or {}).get("sampling")
    if missing and before and before != sampling and len(missing) < dataset.num_class_images:
        logger.warning(
            "class images in %s: the ones there were made with %s, the %d missing ones are made "
            "with %s (the folder mixes both; delete it to make all with the new settings)",
            cache.dir,
            before,
            len(missing),
            sampling,
        )
    manifest = {
        "prompts": cache.merged_prompts(dataset.class_prompts),
        "size": list(size),
        "model": model_id,
        "sampling": sampling,
    }
    cache.write_manifest(manifest)  # first: a folder left half-made is still known
    n = dataset.num_class_images
    if not missing:
        logger.info("class images: all %d in %s are there, none made", n, cache.dir)
        return 0
    todo = set(missing)
    chunks = sorted({i // batch_size for i in missing})
    logger.info(
        "class images: making %d of %d into %s (%s, %d steps, guidance %.1f, seed %d)",
        len(missing),
        n,
        cache.dir,
        sampler,
        steps,
        guidance_scale,
        seed,
    )
    made = 0
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(missing), desc="class images", unit="img", disable=not progress)
        with bar:
            for c in chunks:
                indices = range(c * batch_size, min((c + 1) * batch_size, n))
                prompts = [dataset.class_prompt_of(i) for i in indices]
                images = model.generate(
                    prompts,
                    sampler=sampler,
                    steps=int(steps),
                    guidance_scale=float(guidance_scale),
                    seed=int(seed) + indices[0],  # solver noise (ancestral solvers) of this batch
                    x_T=start_noise(model, seed, indices),
                    negative_prompt=negative_prompt,
                    use_ema=use_ema,
                    output="tensor",
                )  # [B, 3, H, W] in [0, 1]
                for i, image in zip(indices, images):
                    if i in todo:
                        write_atomic(cache.path(i), _png(image, prompts[i - indices[0]], i))
                        made += 1
                        bar.update(1)
    finally:
        model.train(was_training)
    dataset.refresh()
    logger.info(
        "class images: made %d, %d of %d now in %s",
        made,
        n - len(dataset.missing_class_images()),
        n,
        cache.dir,
    )
    return made


def _unwrap(dataset: Any, seen: set[int]) -> Iterator[DreamBoothDataset]:
    """Every DreamBoothDataset inside wrappers (WrappedDataset, Subset, ConcatDataset, ...)."""
    if dataset is None or id(dataset) in seen:
        return
    seen.add(id(dataset))
    if isinstance(dataset, DreamBoothDataset):
        yield dataset
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            yield from _unwrap(part, seen)
    elif isinstance(dataset, WrappedDataset):
        yield from _unwrap(dataset.data, seen)
    elif isinstance(dataset, Subset | DataLoader | Dataset):  # also CachedEncodings and the like
        yield from _unwrap(getattr(dataset, "dataset", None), seen)
    elif isinstance(dataset, dict):
        for part in dataset.values():
            yield from _unwrap(part, seen)


def find_dreambooth_datasets(trainer: pl.Trainer) -> list[DreamBoothDataset]:
    """The DreamBoothDatasets of the training data: the datamodule's train split, or the loaders."""
    candidates: list[Any] = []
    datamodule = trainer.datamodule
    if datamodule is not None:
        built = getattr(datamodule, "datasets", None)  # DataModuleFromConfig
        if isinstance(built, dict):
            candidates.append(built.get("train"))
        candidates += [
            v for v in vars(datamodule).values() if isinstance(v, Dataset | DataLoader | dict)
        ]
    source = getattr(getattr(trainer.fit_loop, "_data_source", None), "instance", None)
    if isinstance(source, DataLoader):  # trainer.fit(model, train_dataloaders=loader)
        candidates.append(source)
    seen: set[int] = set()
    return [ds for c in candidates for ds in _unwrap(c, seen)]


class DreamBoothClassImages(pl.Callback):
    """Before fit draws its first batch, make the missing class images of every DreamBoothDataset.

    Runs in ``setup("fit")`` (Lightning 2.x: after the datamodule's ``setup`` built the data sets,
    before ``configure_optimizers`` (which may build the train loader through
    ``estimated_stepping_batches``), the checkpoint restore and the fit loop's first batch): the
    model still holds the weights it was built with, also on resume. Every rank checks the
    folders (a mismatch fails on all ranks), global rank 0 generates on the strategy's root device
    (in fp32, the module moved there and back), then all ranks meet at a barrier, refresh their
    data sets and require every class image. The model is identified by a digest of its weights
    (``fingerprint``: a fixed identity instead), so a second fit in the same process with
    fine-tuned weights refuses the folder made by the original ones.
    """

    def __init__(
        self,
        batch_size: int = 16,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        guidance_scale: float = 4.0,
        seed: int = 0,
        use_ema: bool = True,
        negative_prompt: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.sampling = {
            "batch_size": int(batch_size),
            "sampler": sampler,
            "steps": int(steps),
            "guidance_scale": float(guidance_scale),
            "seed": int(seed),
            "use_ema": bool(use_ema),
            "negative_prompt": negative_prompt,
        }
        self.fingerprint = fingerprint
        self.made = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.run(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Check every rank's class folders, generate on global rank 0, barrier, refresh."""
        datasets = find_dreambooth_datasets(trainer)
        datasets = [ds for ds in datasets if ds.cache is not None]
        if not datasets:
            logger.warning(
                "DreamBoothClassImages: no DreamBoothDataset with prior preservation in the training data; nothing to make"
            )
            return 0
        model_id = self.fingerprint or model_fingerprint(pl_module)["fingerprint"]  # on every rank
        size = output_size(pl_module)
        for ds in datasets:  # every rank refuses a mismatch itself (no rank left at the barrier)
            ds.refresh()
            ds.cache.check_model(model_id, size)
        start, made = time.perf_counter(), 0
        if trainer.is_global_zero and any(ds.missing_class_images() for ds in datasets):
            made = self._generate(trainer, pl_module, datasets)
        trainer.strategy.barrier("dreambooth_class_images")
        for ds in datasets:
            ds.refresh()
            ds.require_class_images()  # every rank sees every image (a class_dir all ranks share)
        if trainer.is_global_zero:
            logger.info(
                "DreamBoothClassImages: made %d class images for %d data set(s) in %.1f s",
                made,
                len(datasets),
                time.perf_counter() - start,
            )
        self.made = made
        return made

    def _generate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datasets: list) -> int:
        """Generate on the root device; the module goes back where the strategy will take it."""
        from lightning_fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin

        home = next(pl_module.parameters()).device
        root = trainer.strategy.root_device
        pl_module.to(root)
        try:
            return sum(
                generate_class_images(pl_module, ds, fingerprint=self.fingerprint, **self.sampling)
                for ds in datasets
            )
        finally:
            pl_module.to(home)
            for module in pl_module.modules():  # as Lightning's setup hook left it
                if isinstance(module, _DeviceDtypeModuleMixin):
                    module._device = root
