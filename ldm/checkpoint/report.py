"""Missing / unexpected key reports grouped by prefix, and loading that fails only when sampling would."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ldm.engine.schedule import SCHEDULE_BUFFERS

logger = logging.getLogger(__name__)

# Buffers recomputed from the config at construction: harmless when missing from a file
# (the schedule buffers, the VLB weights, the log-variance, the latent scale and shift).
OPTIONAL_BUFFERS = frozenset(
    {*SCHEDULE_BUFFERS, "lvlb_weights", "logvar", "scale_factor", "shift_factor"}
)
# Not used for sampling: EMA copies, training losses, tokenizer position ids.
OPTIONAL_PREFIXES = ("model_ema.", "first_stage_model.loss.", "loss.", "cond_stage_model.loss.")
OPTIONAL_SUFFIXES = ("position_ids",)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint lacks weights that sampling needs (or has them with the wrong shapes)."""


TOP_LEVEL = "<top-level>"


def prefix_of(key: str, depth: int = 2) -> str:
    """First `depth` dotted components (`model.diffusion_model`), or <top-level> for short keys."""
    parts = key.split(".")
    return ".".join(parts[:depth]) if len(parts) > depth else TOP_LEVEL


def group_by_prefix(keys: list[str], depth: int = 2) -> dict[str, int]:
    """Count keys per dotted prefix of `depth` components (e.g. `model.diffusion_model`)."""
    counts: Counter[str] = Counter(prefix_of(k, depth) for k in keys)
    return dict(sorted(counts.items()))


def is_optional(key: str) -> bool:
    """True for keys a model can sample without (recomputed schedule buffers, EMA, losses)."""
    return (
        key in OPTIONAL_BUFFERS
        or key.startswith(OPTIONAL_PREFIXES)
        or key.endswith(OPTIONAL_SUFFIXES)
    )


@dataclass
class KeyReport:
    """Result of matching a state dict against a model."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def fatal(self) -> list[str]:
        """Missing or wrongly shaped keys that sampling needs."""
        return [k for k in self.missing if not is_optional(k)] + [m[0] for m in self.mismatched]

    @property
    def ok(self) -> bool:
        return not self.fatal

    def format(self, max_examples: int = 3) -> str:
        """Human-readable report: counts per prefix with a few example keys."""
        lines: list[str] = []
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if not keys:
                continue
            lines.append(f"{len(keys)} {title} key(s):")
            for prefix, n in group_by_prefix(keys).items():
                group = [k for k in keys if prefix_of(k) == prefix]
                optional = title == "missing" and all(is_optional(k) for k in group)
                note = " (not needed for sampling)" if optional else ""
                label = prefix if prefix == TOP_LEVEL else prefix + ".*"
                lines.append(f"  {label}: {n}{note}  e.g. {', '.join(group[:max_examples])}")
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} key(s) with mismatched shapes:")
            for k, want, got in self.mismatched[: max_examples * 4]:
                lines.append(f"  {k}: model {list(want)}, checkpoint {list(got)}")
        return "\n".join(lines) if lines else "all keys matched"


def compare(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> KeyReport:
    """Compare a state dict with `model.state_dict()` by name and shape."""
    own = model.state_dict()
    report = KeyReport()
    report.missing = [k for k in own if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in own]
    report.mismatched = [
        (k, tuple(own[k].shape), tuple(v.shape))
        for k, v in state_dict.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    return report


def load_checked(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    load: Any = None,
) -> KeyReport:
    """Load non-strictly; raise CheckpointMismatchError if weights needed for sampling are absent.
    ``load(model, state_dict)`` replaces ``load_state_dict`` (e.g. ``assign_weights``)."""
    report = compare(model, state_dict)
    if not report.ok:
        raise CheckpointMismatchError(
            f"{source} does not fit the model: {len(report.fatal)} weight(s) needed for sampling "
            f"are missing or mis-shaped.\n{report.format()}\n"
            "Check the architecture (pass the training config with --config / config=...)."
        )
    bad = {m[0] for m in report.mismatched}
    fitting = {k: v for k, v in state_dict.items() if k not in bad}
    if load is not None:
        load(model, fitting)
    else:
        model.load_state_dict(fitting, strict=False)
    if report.missing or report.unexpected:
        logger.info("Loaded %s with differences:\n%s", source, report.format())
    return report
