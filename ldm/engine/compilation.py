"""``compile``: the U-Net's forward through ``torch.compile``, as a switch.

    compile: true                                  # torch.compile defaults
    compile: {mode: max-autotune, dynamic: false}  # any of COMPILE_OPTIONS

Compiled with ``nn.Module.compile`` (in place: the module's call goes through the compiled
function), so the state-dict keys stay ``model.diffusion_model.*`` without ``_orig_mod.``, and
checkpoints move freely between compiled and eager models. The first step pays the compilation;
new input shapes (another resolution, batch size, sampling with guidance) recompile unless
``dynamic: true``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ldm.util import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

__all__ = ["COMPILE_OPTIONS", "compile_network", "compile_options"]

#: torch.compile's keyword arguments that the config may give
COMPILE_OPTIONS = ("mode", "dynamic", "fullgraph", "backend", "options")


def compile_options(value: Any) -> dict[str, Any] | None:
    """``compile`` -> torch.compile keyword arguments (None: no compilation)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"compile={value!r}: expected true / false or a mapping like "
            "{mode: max-autotune, dynamic: false}."
        )
    for key in value:
        if key not in COMPILE_OPTIONS:
            raise ConfigError(
                f"compile.{key}: unknown option{did_you_mean(str(key), COMPILE_OPTIONS)}; "
                f"torch.compile takes {list(COMPILE_OPTIONS)} here."
            )
    return dict(value)


def compile_network(network: nn.Module, options: Mapping[str, Any] | None) -> None:
    """Compile ``network``'s forward in place (no-op for None)."""
    if options is None:
        return
    network.compile(**options)
    logger.info(
        "compile: %s goes through torch.compile(%s).", type(network).__name__, dict(options)
    )
