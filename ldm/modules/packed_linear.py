"""Linear layers with their weight pre-packed for the CPU's GEMM (inference only).

``PackedLinear(weight, bias)`` computes ``F.linear(x, weight, bias)`` from a copy of the weight
reordered once into the layout the GEMM kernel reads: MKL's packed sgemm for fp32
(``torch.ops.mkl._mkl_reorder_linear_weight``, what inductor's freezing uses), oneDNN's blocked
layout for bf16 (``torch.ops.mkldnn._reorder_linear_weight``, the weight's size). Each call then
skips the per-call packing of the plain kernels. Measured on the 2-core AMX CPU, 154 rows,
768 -> 3072: fp32 0.81-0.86x of ``F.linear``, bf16 0.70-0.75x. MKL's packed buffer is the
weight plus 2-5 M floats (8-18 MB; 2.2x for a 3072 x 768 weight, 4.9x for 768 x 768), so fp32
weights under ``MKL_MIN_ELEMENTS`` stay plain. Anything else (fp16, a build without MKL /
oneDNN, a non-CPU tensor, a kernel that refuses the dtype) keeps ``F.linear`` on the plain
weight. No autograd: the packed kernels have no backward.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: Rows the layout is tuned for (a guided SD prompt batch: 2 x 77 tokens); any row count works.
ROWS_HINT = 154
#: Smallest fp32 weight MKL packs (its buffer carries millions of floats of overhead).
MKL_MIN_ELEMENTS = 1_000_000


def _mkl_ok() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear:
    """``F.linear(x, weight, bias)`` with ``weight`` pre-packed (see the module docstring).
    ``kind`` is "mkl", "mkldnn" or "plain"; ``owns_weight``: ``weight`` is a tensor made for this
    layer (a fused weight), counted in ``nbytes``."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, owns_weight: bool = False
    ) -> None:
        self.weight = weight.detach()
        self.owns_weight = owns_weight
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = self.weight.shape
        self.kind = "plain"
        self.packed: torch.Tensor | None = None
        kind = self.kind_for(self.weight)
        try:
            if kind == "mkl":
                self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, ROWS_HINT)
            elif kind == "mkldnn":
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, ROWS_HINT)
            self.kind = kind
        except RuntimeError as err:  # a CPU or build without the kernel for this dtype
            logger.debug("PackedLinear: keeping F.linear (%s)", err)
            self.kind, self.packed = "plain", None
        if self.packed is not None and owns_weight:
            # the packed copy is all the kernels read: free the plain one, keeping its shape
            # (MKL's call takes the original weight and reads it only for another row count)
            self.weight = self.weight.new_zeros(()).expand(self.out_features, self.in_features)

    @staticmethod
    def kind_for(weight: torch.Tensor) -> str:
        """The packing a weight gets: "mkl" (fp32 of at least ``MKL_MIN_ELEMENTS``), "mkldnn"
        (bf16) or "plain" (anything else, or a build without the kernel)."""
        if weight.device.type != "cpu":
            return "plain"
        if weight.dtype == torch.float32 and weight.numel() >= MKL_MIN_ELEMENTS and _mkl_ok():
            return "mkl"
        if weight.dtype == torch.bfloat16 and _mkldnn_ok():
            return "mkldnn"
        return "plain"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "plain":
            return F.linear(x, self.weight, self.bias)
        if x.dtype != self.weight.dtype or x.device != self.weight.device:
            raise ValueError(
                f"PackedLinear: input {x.dtype} on {x.device}, but the weight was packed as "
                f"{self.weight.dtype} on {self.weight.device}; pack it again for this input"
            )
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kind == "mkl":
            # the packed path runs when the last argument equals the row count
            y = torch.ops.mkl._mkl_linear(x2, self.packed, self.weight, self.bias, x2.shape[0])
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        """Memory this layer holds beyond the module's own parameters."""
        total = 0 if self.packed is None else self.packed.numel() * self.packed.element_size()
        if self.owns_weight:  # a fused / scaled copy (the plain weight is freed once packed)
            for t in (self.weight, self.bias):
                if t is not None and (self.packed is None or t is self.bias):
                    total += t.numel() * t.element_size()
        return total
