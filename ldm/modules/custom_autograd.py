"""When a ``torch.autograd.Function`` with a hand-written backward may stand in for plain ops."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad


def custom_backward_allowed() -> bool:
    """False while ``torch.compile`` traces (inductor fuses the plain operations itself), under
    ``torch.func`` transforms (no rules for custom Functions) and under forward-mode AD (no jvp
    defined for them): the plain operations run there."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
    )
