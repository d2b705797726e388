"""``cache_text_embeddings``: a frozen text encoder encodes each distinct prompt once.

    cache_text_embeddings: true        # or {max_entries: 4096}

Every frozen text embedder's forward is wrapped by a memo keyed by the prompt string: a batch
of prompts is looked up row by row, only the prompts not seen yet are encoded, and the rows are
stacked again. The memo lives in memory (a least-recently-used table of ``max_entries``
prompts: one SD v1 prompt is 77 x 768 floats, 236 kB), so it suits data sets with a bounded set
of captions (DreamBooth, a few thousand captions, the empty prompt of caption dropout); caption
options that change captions every epoch (shuffled or dropped tags) leave little to reuse.
Trainable embedders are never wrapped (their outputs change as they learn). When rows of one
batch come back with different lengths (long prompts encoded in different batches), the batch
is encoded as a whole instead.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 4096


def text_cache_settings(value: Any) -> dict[str, int] | None:
    """The ``cache_text_embeddings`` config value as {max_entries}, or None when off."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping) or set(value) - {"max_entries"}:
        raise ConfigError(
            f"cache_text_embeddings: expected true, false or {{max_entries: N}}, found {value!r}."
        )
    n = int(value.get("max_entries", DEFAULT_MAX_ENTRIES))
    if n < 1:
        raise ConfigError(f"cache_text_embeddings.max_entries: expected >= 1, found {n}.")
    return {"max_entries": n}


def _rows(out: Any, n: int) -> list[Any] | None:
    """Split a batch output (a tensor, or a tuple / list of tensors) into n rows; None if unknown."""
    if isinstance(out, torch.Tensor) and out.shape[:1] == (n,):
        return list(out.detach())
    if isinstance(out, tuple | list) and all(
        isinstance(o, torch.Tensor) and o.shape[:1] == (n,) for o in out
    ):
        return [type(out)(o[i].detach() for o in out) for i in range(n)]
    return None


def _stack(rows: list[Any]) -> Any:
    first = rows[0]
    if isinstance(first, torch.Tensor):
        if any(r.shape != first.shape for r in rows):
            return None
        return torch.stack(rows)
    parts = list(zip(*rows))
    if any(any(r.shape != p[0].shape for r in p) for p in parts):
        return None
    return type(first)(torch.stack(list(p)) for p in parts)


class TextMemo:
    """A forward function memoised by prompt (see the module docstring)."""

    def __init__(self, forward: Callable[..., Any], max_entries: int) -> None:
        self.forward, self.max_entries = forward, int(max_entries)
        self.table: OrderedDict[str, Any] = OrderedDict()
        self.encoded = self.hits = 0

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        prompts = [text] if isinstance(text, str) else text
        if args or kwargs or not isinstance(prompts, list | tuple) or not prompts:
            return self.forward(text, *args, **kwargs)
        if not all(isinstance(p, str) for p in prompts):
            return self.forward(text, *args, **kwargs)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.table))
        if missing:
            out = self.forward(missing)
            rows = _rows(out, len(missing))
            if rows is None:  # an output we do not know how to split: no caching
                return self.forward(text)
            for p, row in zip(missing, rows):
                self.table[p] = row
            self.encoded += len(missing)
        self.hits += len(prompts) - len(missing)
        for p in prompts:
            self.table.move_to_end(p)
        stacked = _stack([self.table[p] for p in prompts])
        while len(self.table) > self.max_entries:
            self.table.popitem(last=False)
        return stacked if stacked is not None else self.forward(text)


def frozen_text_modules(engine: nn.Module) -> list[nn.Module]:
    """The frozen text-encoder modules of an engine (its cond stage, or SDXL's embedders)."""
    conditioner = getattr(engine, "conditioner", None)
    if conditioner is None:
        return []
    out = []
    entries = getattr(conditioner, "entries", [])
    modules = getattr(conditioner, "embedders", None)
    for i, e in enumerate(entries):
        if not isinstance(e.null, str) or e.is_trainable:
            continue
        module = modules[i] if modules is not None else getattr(engine, "cond_stage_model", None)
        if isinstance(module, nn.Module) and not any(p.requires_grad for p in module.parameters()):
            out.append(module)
    return out


def enable_text_cache(engine: nn.Module, settings: Mapping[str, int]) -> list[TextMemo]:
    """Wrap the forward of every frozen text embedder of ``engine`` in a ``TextMemo``."""
    memos = []
    for module in frozen_text_modules(engine):
        memo = TextMemo(module.forward, settings["max_entries"])
        module.forward = memo  # an instance attribute: nn.Module.__call__ finds it first
        memos.append(memo)
    if not memos:
        logger.warning("cache_text_embeddings: this model has no frozen text encoder to cache.")
    else:
        logger.info("cache_text_embeddings: %d frozen text encoder(s) memoised", len(memos))
    return memos
