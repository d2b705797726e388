"""Prompts longer than the text encoder's context, encoded in chunks (as AUTOMATIC1111 and kohya).

A prompt is tokenized without truncation (after the emphasis syntax of ``prompt_weighting`` is
parsed, when ``emphasis`` is on), its ids are cut into windows of ``max_length - 2`` tokens
(75 for CLIP's 77; ``BREAK`` also ends a window) and each window becomes the sequence
``[BOS] + window + [EOS] + pad`` of ``max_length`` ids, padded as the encoder's tokenizer pads
(the end token for SD v1's Hugging Face CLIP, 0 for open_clip). Every window is encoded on its own
by the text transformer; the outputs are concatenated along the sequence axis:
``[B, max_length * n_chunks, D]``. A prompt that fits in one window gives the sequence the
truncating tokenizer gives, so its encoding is unchanged, bit for bit.

Within a batch all prompts get the chunk count of the longest; the extra chunks are empty windows
(``[BOS, EOS, pad...]``, the sequence of the empty prompt). At most ``max_chunks`` chunks are
kept (``max_chunks=1``: the old truncation); a longer prompt is cut with a warning (once per
encoder). Outputs that are not per token (pooled text vectors, ``layer="pooled"``) are the first
chunk's. Weights multiply the output rows of their tokens: ``z_i <- w_i * z_i``; the rows of
unweighted tokens and of BOS, EOS and padding are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.modules.encoders.prompt_weighting import Fragment, parse_prompt, plain_prompt
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHUNKS = 3  # 225 tokens, kohya sd-scripts' max_token_length=225
Window = tuple[list[int], list[float]]


@dataclass
class ChunkedTokens:
    """Token ids and per-token weights of a batch of prompts, chunk by chunk."""

    ids: torch.Tensor  # [B, n_chunks, max_length] long
    weights: torch.Tensor  # [B, n_chunks, max_length] float, 1 for BOS / EOS / padding
    cut: list[bool]  # per prompt: windows beyond max_chunks were dropped

    @property
    def n_chunks(self) -> int:
        """Chunks per prompt (the same for every prompt of the batch)."""
        return int(self.ids.shape[1])


def prompt_windows(tokenizer: Any, text: str, window: int, emphasis: bool = True) -> list[Window]:
    """Windows of at most ``window`` (id, weight) pairs of one prompt; at least one (maybe empty)."""
    segments: list[list[Fragment]] = parse_prompt(text) if emphasis else plain_prompt(text)
    windows: list[Window] = []
    for segment in segments:
        ids: list[int] = []
        weights: list[float] = []
        for piece, weight in segment:
            piece_ids = tokenizer.encode(piece)
            ids += piece_ids
            weights += [float(weight)] * len(piece_ids)
        for start in range(0, len(ids), window):
            windows.append((ids[start : start + window], weights[start : start + window]))
    return windows or [([], [])]


def chunk_sequence(tokenizer: Any, window: Window, max_length: int) -> Window:
    """``[BOS] + window + [EOS] + pad`` to ``max_length`` ids, weight 1 outside the window."""
    ids, weights = window
    pad = max_length - len(ids) - 2
    seq = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
    return seq, [1.0, *weights, 1.0] + [1.0] * pad


def tokenize_chunks(
    tokenizer: Any,
    texts: str | Sequence[str],
    max_length: int,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    emphasis: bool = True,
) -> ChunkedTokens:
    """Chunked ids ``[B, n_chunks, max_length]`` of ``texts``, padded to the batch's longest."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    per_prompt = [prompt_windows(tokenizer, t, max_length - 2, emphasis) for t in texts]
    cut = [len(w) > max_chunks for w in per_prompt]
    per_prompt = [w[:max_chunks] for w in per_prompt]
    n = max((len(w) for w in per_prompt), default=1)
    empty: Window = ([], [])
    rows = [
        [chunk_sequence(tokenizer, w, max_length) for w in windows + [empty] * (n - len(windows))]
        for windows in per_prompt
    ]
    ids = torch.tensor([[c[0] for c in row] for row in rows], dtype=torch.long)
    weights = torch.tensor([[c[1] for c in row] for row in rows], dtype=torch.float32)
    return ChunkedTokens(ids.view(len(texts), n, max_length), weights.view(len(texts), n, -1), cut)


def as_chunks(tokens: torch.Tensor, max_length: int) -> torch.Tensor:
    """Ready token ids as ``[B, n_chunks, L]``: ``[B, n * max_length]`` is split into chunks;
    any other ``[B, L]`` is one chunk as given (the encoder's old behaviour)."""
    if tokens.ndim == 3:
        return tokens
    if tokens.ndim == 2 and tokens.shape[1] > max_length and tokens.shape[1] % max_length == 0:
        return tokens.view(tokens.shape[0], -1, max_length)
    return tokens[:, None, :]


def check_max_chunks(owner: str, max_chunks: int) -> int:
    """``max_chunks`` as an int >= 1, or a ConfigError naming the fix."""
    if isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1:
        raise ConfigError(
            f"{owner}: max_chunks must be an integer >= 1 (1 = truncate at the context length, "
            f"{DEFAULT_MAX_CHUNKS} = {DEFAULT_MAX_CHUNKS * 75} CLIP tokens), got {max_chunks!r}."
        )
    return max_chunks


class LongPromptMixin:
    """Chunked encoding for text encoders with ``tokenizer`` and ``max_length`` attributes.

    ``encode_prompts(text, encode_ids)`` tokenizes in chunks and calls ``encode_ids(ids [M, L])``
    once for all chunks of the batch; ``encode_ids`` returns states ``[M, L, D]`` (or a
    non-sequence output such as ``[M, 1, D]``), optionally with a pooled ``[M, E]`` in a tuple.
    """

    max_chunks: int = DEFAULT_MAX_CHUNKS
    emphasis: bool = True

    def init_long_prompts(self, max_chunks: int, emphasis: bool) -> None:
        """Set (and check) the chunk limit and whether the emphasis syntax is parsed."""
        self.max_chunks = check_max_chunks(type(self).__name__, max_chunks)
        self.emphasis = bool(emphasis)
        self._warned_cut = False
        if self.max_length < 3:
            raise ConfigError(
                f"{type(self).__name__}: max_length={self.max_length} leaves no room for tokens "
                "between the start and end tokens; use max_length >= 3."
            )

    def tokenize_chunks(self, text: str | Sequence[str]) -> ChunkedTokens:
        """Chunked ids and weights of prompts (see ``tokenize_chunks``), warning once on a cut."""
        tokens = tokenize_chunks(
            self.tokenizer, text, self.max_length, self.max_chunks, self.emphasis
        )
        if any(tokens.cut) and not getattr(self, "_warned_cut", False):
            self._warned_cut = True
            logger.warning(
                "%s: a prompt is longer than max_chunks=%d chunks of %d tokens and was cut; "
                "raise max_chunks in the embedder's params to keep more (warned once).",
                type(self).__name__,
                self.max_chunks,
                self.max_length - 2,
            )
        return tokens

    def encode_prompts(
        self,
        text: str | Sequence[str] | torch.Tensor,
        encode_ids: Callable[[torch.Tensor], Any],
        device: torch.device | None = None,
    ) -> Any:
        """Encode prompts (or ready ids) chunk by chunk; concatenate, weight, pool the first."""
        if isinstance(text, torch.Tensor):
            ids, weights = as_chunks(text, self.max_length), None
        else:
            chunked = self.tokenize_chunks(text)
            ids, weights = chunked.ids, chunked.weights
        b, n, length = ids.shape
        out = encode_ids(ids.reshape(b * n, length).to(device or ids.device))
        z, pooled = out if isinstance(out, tuple) else (out, None)
        if z.shape[1] == length:  # per-token states: chunks side by side
            z = z.reshape(b, n * length, *z.shape[2:])
            if weights is not None and bool((weights != 1).any()):
                w = weights.reshape(b, n * length, *([1] * (z.ndim - 2)))
                z = z * w.to(device=z.device, dtype=z.dtype)
        else:  # not per token (layer="pooled"): the first chunk's
            z = z.reshape(b, n, *z.shape[1:])[:, 0]
        if pooled is None:
            return z
        return z, pooled.reshape(b, n, *pooled.shape[1:])[:, 0]
