"""The optimizer from a config (``optimizer_config`` of the diffusion engine).

    optimizer_config:
      type: adamw              # see OPTIMIZER_TYPES; or `target: torch.optim.X` with `params: {...}`
      betas: [0.9, 0.999]      # the optimizer's keyword arguments, all but params and lr
      weight_decay: 1.0e-2
      param_groups: [...]      # per-name learning rates and options (ldm.param_groups)
      freeze: [...]            # parameters that do not train at all (ldm.param_groups)

The learning rate is always the model's (``model.learning_rate``: main.py sets it from
``base_learning_rate`` and its scaling), per group absolute or scaled. No ``optimizer_config``
gives exactly the optimizer of before: ``ldm.optim.adamw`` (fused where it applies, torch defaults).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ldm.optim import adamw
from ldm.param_groups import GroupRule, parse_group_rules, split_into_groups
from ldm.util import ConfigError, did_you_mean, get_obj_from_str, plain

logger = logging.getLogger(__name__)

__all__ = ["OPTIMIZER_TYPES", "OptimizerSpec", "build_optimizer", "optimizer_class"]

OPTIM_EXTRA = "pip install 'ldm[optim]'"
#: keys of optimizer_config that are not the optimizer's own keyword arguments
OWN_KEYS = ("type", "target", "params", "param_groups", "freeze")


@dataclass(frozen=True)
class OptimizerType:
    """Where a ``type`` name's class lives, and which package brings it."""

    module: str
    attr: str
    package: str | None  # the pip package (None: part of torch)
    about: str


OPTIMIZER_TYPES: dict[str, OptimizerType] = {
    "adamw": OptimizerType(
        "torch.optim", "AdamW", None, "AdamW (Loshchilov & Hutter), fused where it applies"
    ),
    "adamw8bit": OptimizerType(
        "bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "AdamW with 8-bit block-wise states"
    ),
    "lion": OptimizerType("lion_pytorch", "Lion", "lion-pytorch", "Lion (Chen et al. 2023)"),
    "lion8bit": OptimizerType(
        "bitsandbytes.optim", "Lion8bit", "bitsandbytes", "Lion with an 8-bit state"
    ),
    "adafactor": OptimizerType(
        "torch.optim", "Adafactor", None, "Adafactor (Shazeer & Stern), factored second moments"
    ),
    "prodigy": OptimizerType(
        "prodigyopt", "Prodigy", "prodigyopt", "Prodigy (Mishchenko & Defazio), lr is a multiplier"
    ),
    "sgd": OptimizerType("torch.optim", "SGD", None, "SGD (with momentum / Nesterov if given)"),
}
#: transformers' Adafactor (torch < 2.5 has none): take the learning rate from the config
HF_ADAFACTOR_DEFAULTS = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
#: Prodigy estimates the step size itself; its lr multiplies that estimate
PRODIGY_LR_RANGE = (0.1, 10.0)


def _import_class(name: str, kind: OptimizerType) -> type:
    try:
        module = importlib.import_module(kind.module)
    except ImportError as err:
        raise ConfigError(
            f"optimizer_config.type: {name!r} needs the package '{kind.package}', which is not "
            f"installed ({err}). Install the optimizer extra: {OPTIM_EXTRA} "
            f"(or pip install {kind.package})."
        ) from None
    return getattr(module, kind.attr)


def optimizer_class(name: str) -> tuple[type, dict[str, Any]]:
    """(class, our default keyword arguments) of an optimizer ``type``."""
    if name not in OPTIMIZER_TYPES:
        raise ConfigError(
            f"optimizer_config.type: unknown optimizer {name!r}{did_you_mean(name, OPTIMIZER_TYPES)};"
            f" expected one of {list(OPTIMIZER_TYPES)}, or `target: torch.optim.X` with `params`."
        )
    kind = OPTIMIZER_TYPES[name]
    if name == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        try:
            from transformers.optimization import Adafactor
        except ImportError as err:
            raise ConfigError(
                f"optimizer_config.type: 'adafactor' needs torch >= 2.5 or transformers ({err})."
            ) from None
        return Adafactor, dict(HF_ADAFACTOR_DEFAULTS)
    return _import_class(name, kind), {}


def accepted_options(cls: type) -> tuple[str, ...] | None:
    """The keyword arguments ``cls`` takes besides params and lr (None: it takes any)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    names = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in ("params", "lr"):
            names.append(p.name)
    return tuple(names)


def _as_arguments(options: Mapping[str, Any]) -> dict[str, Any]:
    """YAML lists become tuples (betas, Adafactor's eps)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _check_options(options: Mapping[str, Any], accepted: tuple[str, ...] | None, who: str) -> None:
    for key in options:
        if key == "lr":
            raise ConfigError(
                "optimizer_config.lr: the learning rate is model.base_learning_rate (times "
                "main.py's scaling); give a group its own with param_groups[].lr or lr_scale."
            )
        if accepted is not None and key not in accepted:
            raise ConfigError(
                f"optimizer_config: {who} has no option '{key}'{did_you_mean(key, accepted)}; "
                f"it takes {list(accepted)} (and param_groups, freeze)."
            )


@dataclass(frozen=True)
class OptimizerSpec:
    """A checked ``optimizer_config``."""

    name: str  # the type, or the target path
    cls: type
    options: dict[str, Any] = field(default_factory=dict)
    groups: tuple[GroupRule, ...] = ()
    freeze: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> OptimizerSpec | None:
        """The spec of ``optimizer_config`` (None: none given); every mistake is a ConfigError."""
        config = plain(config)
        if config is None:
            return None
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"optimizer_config: expected a mapping like {{type: adamw, weight_decay: 0.01}}, "
                f"found {config!r}."
            )
        config = dict(config)
        if "type" in config and "target" in config:
            raise ConfigError("optimizer_config: give `type` or `target`, not both.")
        if "target" in config:
            name = str(config["target"])
            klass = get_obj_from_str(name, path="optimizer_config")
            if not (isinstance(klass, type) and issubclass(klass, torch.optim.Optimizer)):
                raise ConfigError(
                    f"optimizer_config.target: {name!r} is not a torch.optim.Optimizer class."
                )
            defaults: dict[str, Any] = {}
            options = dict(config.get("params") or {})
            stray = [k for k in config if k not in OWN_KEYS]
            if stray:
                raise ConfigError(
                    f"optimizer_config: with `target`, the optimizer's options go under `params`; "
                    f"found {stray} beside it."
                )
        else:
            name = str(config.get("type", "adamw"))
            klass, defaults = optimizer_class(name)
            if "params" in config:
                raise ConfigError(
                    "optimizer_config.params goes with `target`; with `type` give the options "
                    "directly (e.g. weight_decay: 0.01)."
                )
            options = {k: v for k, v in config.items() if k not in OWN_KEYS}
        accepted = accepted_options(klass)
        _check_options(options, accepted, name)
        group_options = accepted if accepted is not None else ()
        groups = parse_group_rules(config.get("param_groups"), group_options)
        freeze = config.get("freeze") or ()
        if isinstance(freeze, str):
            freeze = [freeze]
        return cls(
            name=name,
            cls=klass,
            options=_as_arguments({**defaults, **options}),
            groups=tuple(
                GroupRule(r.pattern, r.where, r.lr, r.lr_scale, _as_arguments(r.options), r.name)
                for r in groups
            ),
            freeze=tuple(freeze),
        )


@functools.cache
def _cpu_8bit_failure(cls: type) -> str | None:
    """Why ``cls`` (a bitsandbytes optimizer) cannot step on CPU tensors, or None when it can:
    one step on a 4096-element tensor (bitsandbytes keeps smaller tensors' states in 32 bits)."""
    p = nn.Parameter(torch.zeros(4096))
    p.grad = torch.ones(4096)
    try:
        cls([p], lr=1e-3).step()
    except Exception as err:  # noqa: BLE001 - any failure means: not on this device
        return f"{type(err).__name__}: {err}"
    return None


def _check_device(spec: OptimizerSpec, params: Sequence[nn.Parameter]) -> None:
    if not spec.cls.__module__.startswith("bitsandbytes"):
        return
    if any(p.device.type == "cpu" for p in params):
        why = _cpu_8bit_failure(spec.cls)
        if why is not None:
            import bitsandbytes

            raise ConfigError(
                f"optimizer_config.type: {spec.name!r} (bitsandbytes {bitsandbytes.__version__}) "
                f"does not run on the CPU here ({why}); its 8-bit optimizers need a CUDA device "
                "in this version. Train on a GPU, or use type: adamw (or adafactor / lion for "
                "smaller states) on the CPU."
            )


def build_optimizer(
    params: Sequence[nn.Parameter],
    names: Mapping[int, Sequence[str]],
    base_lr: float,
    spec: OptimizerSpec | None,
) -> torch.optim.Optimizer:
    """The optimizer over ``params`` (``names``: id -> parameter names, for ``param_groups``)."""
    params = list(params)
    if spec is None:
        return adamw(params, lr=base_lr)
    if spec.name == "prodigy" and not PRODIGY_LR_RANGE[0] <= base_lr <= PRODIGY_LR_RANGE[1]:
        logger.warning(
            "Prodigy estimates the step size itself and its lr multiplies that estimate (1.0 as "
            "its authors use it); the learning rate here is %.3g. Set model.base_learning_rate: "
            "1.0 and --scale_lr false.",
            base_lr,
        )
    _check_device(spec, params)
    groups: list[Any] = (
        split_into_groups(params, names, spec.groups, base_lr) if spec.groups else params
    )
    if spec.cls is torch.optim.AdamW:
        return adamw(groups, lr=base_lr, **spec.options)
    if spec.options.get("relative_step"):  # transformers' Adafactor: its own step size, no lr
        return spec.cls(groups, lr=None, **spec.options)
    return spec.cls(groups, lr=base_lr, **spec.options)
