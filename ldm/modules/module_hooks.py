"""Whether a module's own forward does more than its parameters say (hooks, parametrizations):
hand-written fast paths that read a module's parameters directly stand aside for such modules."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

# transformers 5 leaves these on the layers after an ``output_hidden_states`` call; they only
# record outputs while transformers collects them (inert here)
_INERT_HOOKS = ("transformers.utils.output_capturing",)


def hooked(module: nn.Module) -> bool:
    """A forward hook on ``module`` (other than transformers' inert output-capturing ones) or on
    every module (``nn.modules.module.register_module_forward_hook`` and its pre-hook twin), or a
    parametrization: the module's own forward would do more than its parameters say."""
    hooks = [
        *module._forward_hooks.values(),
        *module._forward_pre_hooks.values(),
        *_module._global_forward_hooks.values(),
        *_module._global_forward_pre_hooks.values(),
    ]
    return parametrize.is_parametrized(module) or any(
        getattr(h, "__module__", None) not in _INERT_HOOKS for h in hooks
    )
