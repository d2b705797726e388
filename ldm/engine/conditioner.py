"""The Conditioner: raw inputs (prompts, class labels, masks) -> the conditioning the network takes.

Each embedder names its ``input_key`` in the batch, the kind of output it adds (``crossattn``: a
sequence for cross-attention; ``vector``: added to the timestep embedding; ``concat``: channels
concatenated to the input; ``auto``: each output tensor by its number of dimensions, 2 -> vector,
3 -> crossattn, 4 or 5 -> concat, sgm's rule, for embedders with several outputs), its
caption-dropout rate ``ucg_rate`` (Ho & Salimans 2022, Alg. 1: the input becomes its null value
with that probability in training; with ``zero_null`` the embedding is zeroed instead, as SDXL
does) and whether it trains.
Conditional and unconditional / negative conditionings come from the same path: the unconditional
inputs are the null values (or the negative prompt) of the embedders that have one, while concat
inputs (an inpainting mask, a low-resolution image) stay as they are.
(sgm ``GeneralConditioner``: learn the shape, not the code.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.engine.context_length import align_outputs, match_context_lengths, sequence_parts
from ldm.util import DataKeyError

KINDS = ("crossattn", "vector", "concat", "auto")
NDIM_KINDS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
ZERO_KEY = "__zero_embedding__."  # batch key prefix: rows whose embedding is zeroed (dropout)


@dataclass
class Embedder:
    """One conditioning input: where it is read, what it becomes, how it is dropped."""

    input_key: str | tuple[str, ...]
    encode: Callable[[Any], Any]
    kind: str = "crossattn"
    ucg_rate: float = 0.0
    null: Any = (
        None  # the raw input meaning "no condition" ("" / the null class); None: kept in uncond
    )
    is_trainable: bool = False
    zero_null: bool = False  # "no condition" is a zero embedding (SDXL), not the encoded null

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"embedder kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not 0.0 <= float(self.ucg_rate) <= 1.0:
            raise ValueError(
                f"ucg_rate of '{self.input_key}' must be in [0, 1], got {self.ucg_rate}"
            )

    @property
    def keys(self) -> tuple[str, ...]:
        return self.input_key if isinstance(self.input_key, tuple) else (self.input_key,)

    def read(self, inputs: Mapping[str, Any]) -> Any:
        """This embedder's raw input: one entry, or a dict of several (concat inputs)."""
        if isinstance(self.input_key, tuple):
            return {k: inputs[k] for k in self.input_key}
        return inputs[self.input_key]


def drop_entries(
    entries: Any, rate: float, null: Any, generator: torch.Generator | None = None
) -> Any:
    """Each entry becomes ``null`` with probability ``rate`` (lists in place; tensors by where)."""
    drop = torch.rand(len(entries), generator=generator) < rate
    if isinstance(entries, torch.Tensor):
        null_t = torch.as_tensor(null, dtype=entries.dtype, device=entries.device)
        mask = drop.to(entries.device).view(-1, *([1] * (entries.ndim - 1)))  # [B, 1, ...]
        return torch.where(mask, null_t, entries)
    for i in torch.nonzero(drop).flatten().tolist():
        entries[i] = null
    return entries


def zero_like(out: Any) -> Any:
    """Zeros shaped as an embedder output (a tensor or a tuple of tensors)."""
    if isinstance(out, tuple | list):
        return type(out)(torch.zeros_like(o) for o in out)
    return torch.zeros_like(out)


def zero_rows(out: Any, rows: torch.Tensor) -> Any:
    """An embedder output with the batch rows where ``rows`` is True set to zero."""
    if isinstance(out, tuple | list):
        return type(out)(zero_rows(o, rows) for o in out)
    keep = ~rows.to(out.device).view(-1, *([1] * (out.ndim - 1)))  # bool: out * keep keeps dtype
    return out * keep


class Conditioner:
    """Embedders (``entries``), and ``assemble(outputs) -> cond``: the structure the network's
    ``apply_model`` takes from the embedders' outputs in order (one tensor, or {"c_concat": [...],
    "c_crossattn": [...]})."""

    def __init__(
        self, embedders: Sequence[Embedder], assemble: Callable[[list[Any]], Any] | None = None
    ) -> None:
        self.entries = list(embedders)
        self.assemble = assemble or (lambda outs: outs[0])

    @property
    def input_keys(self) -> list[str]:
        return list(dict.fromkeys(k for e in self.entries for k in e.keys))

    def text_key(self) -> str | None:
        """The input key of the (first) prompt embedder, if any."""
        for e in self.entries:
            if isinstance(e.null, str):
                return e.keys[0]
        return None

    def drop(
        self, batch: MutableMapping[str, Any], generator: torch.Generator | None = None
    ) -> MutableMapping[str, Any]:
        """Caption dropout for classifier-free guidance training, per embedder (in place): the
        input becomes its null value, or (``zero_null``) the rows to zero are recorded in the batch
        under ``ZERO_KEY + index`` for ``embed``."""
        for i, e in enumerate(self.entries):
            if e.ucg_rate <= 0:
                continue
            key = e.keys[0]
            if key not in batch:
                raise DataKeyError(
                    f"conditioning input '{key}' (ucg_rate {e.ucg_rate}) is not in the batch "
                    f"(keys: {sorted(batch)}); set the embedder's input key to a key your data "
                    "set yields."
                )
            if e.zero_null:
                n = len(batch[key])
                batch[ZERO_KEY + str(i)] = torch.rand(n, generator=generator) < e.ucg_rate
                continue
            if e.null is None:
                raise ValueError(
                    f"conditioning input '{key}' has ucg_rate {e.ucg_rate} but no null value; "
                    "give one (e.g. ucg_training.<key>.val: the null class index)."
                )
            batch[key] = drop_entries(batch[key], e.ucg_rate, e.null, generator)
        return batch

    def _check(self, inputs: Mapping[str, Any]) -> None:
        missing = [k for k in self.input_keys if k not in inputs]
        if missing:
            raise KeyError(
                f"conditioning inputs {missing} are missing (given: {sorted(inputs)}); this model "
                f"is conditioned on {self.input_keys}."
            )

    def embed(self, inputs: Mapping[str, Any]) -> list[Any]:
        """Each embedder's output for ``inputs``, in order (rows marked by ``drop`` zeroed)."""
        self._check(inputs)
        outs = self.align([e.encode(e.read(inputs)) for e in self.entries])
        for i in range(len(outs)):
            rows = inputs.get(ZERO_KEY + str(i))
            if rows is not None:
                outs[i] = zero_rows(outs[i], rows)
        return outs

    # -- long prompts: contexts of different lengths (ldm.engine.context_length)
    def _is_text(self, i: int) -> bool:
        e = self.entries[i]
        return isinstance(e.null, str) and e.kind in ("crossattn", "auto")

    def empty_output(self, i: int) -> Any:
        """Embedder i's output for the prompt "": one empty-window chunk."""
        return self.entries[i].encode([""])

    def align(self, outputs: list[Any]) -> list[Any]:
        """Text embedders' outputs padded to a common context length (e.g. SDXL's two encoders,
        should their tokenizers give different chunk counts) with empty-window chunks."""
        text = [self._is_text(i) for i in range(len(outputs))]
        if sum(text) < 2:
            return outputs
        return align_outputs(outputs, self.empty_output, text)

    def empty_context(self) -> torch.Tensor | None:
        """The assembled cross-attention context of one empty window ``[1, L, D]`` (each text
        embedder's encoding of "", concatenated on the feature axis as ``assemble`` does)."""
        parts = [p for i in range(len(self.entries)) if self._is_text(i)
                 for p in sequence_parts(self.empty_output(i))]  # fmt: skip
        return torch.cat(parts, dim=-1) if parts else None

    def match_lengths(self, cond: Any, uncond: Any) -> tuple[Any, Any]:
        """(cond, uncond) with the shorter cross-attention context padded with empty-window
        chunks, so that guidance can batch them (a long prompt with a short negative prompt)."""
        return match_context_lengths(cond, uncond, self.empty_context)

    def encode(self, inputs: Mapping[str, Any]) -> Any:
        """The conditioning of ``inputs`` (a batch dict with every embedder's input keys)."""
        return self.assemble(self.embed(inputs))

    def _cond_output(self, i: int, inputs: Mapping[str, Any], outputs: list[Any] | None) -> Any:
        """Embedder i's conditional output: from ``outputs`` of ``embed`` when given."""
        e = self.entries[i]
        return outputs[i] if outputs is not None else e.encode(e.read(inputs))

    def uncond(
        self,
        inputs: Mapping[str, Any],
        n: int,
        negative_prompt: str | Sequence[str] | None = None,
        outputs: list[Any] | None = None,
    ) -> Any:
        """The unconditional / negative conditioning through the same embedders: null inputs (or the
        negative prompt) where an embedder has a null value, zeros where it has ``zero_null`` and no
        negative prompt is given (SDXL; diffusers' ``force_zeros_for_empty_prompt``); the other
        embedders' conditional outputs (``outputs`` of ``embed``, e.g. an inpainting mask or the
        image size) are reused as they are. Identical null inputs are encoded once and repeated (as
        CompVis ``get_unconditional_conditioning``)."""
        self._check(inputs)
        outs = []
        for i, e in enumerate(self.entries):
            if e.null is None:
                outs.append(self._cond_output(i, inputs, outputs))
                continue
            if e.zero_null and negative_prompt is None:
                outs.append(zero_like(self._cond_output(i, inputs, outputs)))
                continue
            if negative_prompt is not None and isinstance(e.null, str):
                neg = (
                    [negative_prompt] * n
                    if isinstance(negative_prompt, str)
                    else list(negative_prompt)
                )
                if len(neg) != n:
                    raise ValueError(f"{len(neg)} negative prompts for {n} samples")
                values: Any = neg
            elif isinstance(e.null, str):
                values = [e.null] * n
            elif isinstance(e.null, float):
                values = torch.full((n,), e.null)  # e.g. SDXL's negative aesthetic score
            else:
                values = torch.full((n,), int(e.null), dtype=torch.long)
            if n > 1 and all(v == values[0] for v in list(values)):
                outs.append(repeat_cond(e.encode(values[:1]), n))
            else:
                outs.append(e.encode(values))
        return self.assemble(self.align(outs))


def repeat_cond(cond: Any, n: int) -> Any:
    """A conditioning of batch 1 expanded to batch n (tensors, lists and dicts of them)."""
    if isinstance(cond, torch.Tensor):
        return cond[:1].expand(n, *cond.shape[1:])
    if isinstance(cond, dict):
        return {k: repeat_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, list | tuple):
        return type(cond)(repeat_cond(v, n) for v in cond)
    return cond
