"""CompVis's base class for iterable text-to-image data sets, at its CompVis import path
(``from ldm.data.base import Txt2ImgIterableBaseDataset``), so a user's existing data module
imports unchanged. ``worker_init_fn`` (``ldm.data.datamodule``) gives each loader worker a
contiguous share of ``valid_ids`` as ``sample_ids``."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset

__all__ = ["Txt2ImgIterableBaseDataset"]


class Txt2ImgIterableBaseDataset(IterableDataset):
    """An iterable data set of ``num_records`` records; subclasses implement ``__iter__`` over
    ``self.sample_ids`` (all of ``valid_ids`` until a worker is given its share)."""

    def __init__(
        self, num_records: int = 0, valid_ids: Sequence[int] | None = None, size: int = 256
    ) -> None:
        super().__init__()
        self.num_records = int(num_records)
        self.valid_ids = list(valid_ids) if valid_ids is not None else list(range(num_records))
        self.sample_ids = self.valid_ids
        self.size = size

    def __len__(self) -> int:
        return self.num_records

    @abstractmethod
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield items (dicts) for the ids in ``self.sample_ids``."""
