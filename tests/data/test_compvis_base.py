"""A CompVis iterable data set (subclass of ``ldm.data.base.Txt2ImgIterableBaseDataset``) imports
unchanged, and two loader workers each yield their own share of the records."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ldm.data.base import Txt2ImgIterableBaseDataset
from ldm.data.datamodule import worker_init_fn


class Records(Txt2ImgIterableBaseDataset):
    def __iter__(self):  # noqa: ANN204
        for i in self.sample_ids:
            yield {"image": torch.full((2, 2, 3), float(i)), "caption": f"record {i}"}


def test_workers_split_the_records() -> None:
    data = Records(num_records=8, valid_ids=list(range(8)), size=2)
    assert len(data) == 8 and data.sample_ids == list(range(8))
    loader = DataLoader(data, batch_size=2, num_workers=2, worker_init_fn=worker_init_fn)
    seen = sorted(c for batch in loader for c in batch["caption"])
    assert seen == sorted(f"record {i}" for i in range(8))  # each record once
