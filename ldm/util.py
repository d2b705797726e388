"""Construction from configs: ``instantiate_from_config``, the legacy target alias table, helpers.

Configs follow the CompVis/Stability format: every component is ``{target: dotted.path, params: {...}}``.
Original module paths (``ldm.modules.diffusionmodules.openaimodel.UNetModel``, ...) resolve through
:data:`LEGACY_TARGETS`, so official configs run unchanged. Mistakes raise :class:`ConfigError`, which
names the key path, what was expected, what was found and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Original target paths used by CompVis/latent-diffusion, CompVis/stable-diffusion,
#: Stability-AI/stablediffusion and taming-transformers configs -> our classes.
#: Paths that already exist in our layout (``ldm.models.autoencoder.AutoencoderKL``,
#: ``ldm.modules.encoders.modules.*``, ``ldm.modules.losses.*``, ``ldm.lr_scheduler.*``,
#: ``torch.nn.Identity``) import directly and need no entry.
LEGACY_TARGETS: dict[str, str] = {
    # U-Net
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": "ldm.modules.unet.UNetModel",
    "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel": "ldm.modules.unet.EncoderUNetModel",
    "ldm.modules.attention.SpatialTransformer": "ldm.modules.attention.SpatialTransformer",
    # autoencoder building blocks
    "ldm.modules.diffusionmodules.model.Encoder": "ldm.modules.autoencoder.Encoder",
    "ldm.modules.diffusionmodules.model.Decoder": "ldm.modules.autoencoder.Decoder",
    "ldm.modules.distributions.distributions.DiagonalGaussianDistribution": (
        "ldm.modules.distributions.DiagonalGaussianDistribution"
    ),
    "taming.modules.vqvae.quantize.VectorQuantizer2": "ldm.modules.quantize.VectorQuantizer",
    "taming.modules.vqvae.quantize.VectorQuantizer": "ldm.modules.quantize.VectorQuantizer",
    "ldm.modules.vqvae.quantize.VectorQuantizer2": "ldm.modules.quantize.VectorQuantizer",
    # autoencoder losses
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": (
        "ldm.modules.losses.VQLPIPSWithDiscriminator"
    ),
    "taming.modules.losses.LPIPS": "ldm.modules.losses.LPIPS",
    "taming.modules.losses.lpips.LPIPS": "ldm.modules.losses.LPIPS",
    "taming.models.vqgan.VQModel": "ldm.models.autoencoder.VQModel",
    "taming.modules.discriminator.model.NLayerDiscriminator": (
        "ldm.modules.losses.discriminator.NLayerDiscriminator"
    ),
    # diffusion models
    "ldm.models.diffusion.ddpm.DDPM": "ldm.models.diffusion.ddpm.DDPM",
    "ldm.models.diffusion.ddpm.LatentDiffusion": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": (
        "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    ),
    "ldm.models.diffusion.ddpm.DiffusionWrapper": "ldm.models.diffusion.ddpm.DiffusionWrapper",
    # EMA, training entry points
    "ldm.modules.ema.LitEma": "ldm.ema.LitEma",
    "main.DataModuleFromConfig": "ldm.data.datamodule.DataModuleFromConfig",
    "main.ImageLogger": "ldm.callbacks.ImageLogger",
    "main.SetupCallback": "ldm.callbacks.SetupCallback",
    "main.CUDACallback": "ldm.callbacks.CUDACallback",
    "main.WrappedDataset": "ldm.data.datamodule.WrappedDataset",
    # class-conditional / text conditioners of latent-diffusion
    "ldm.modules.encoders.modules.ClassEmbedder": "ldm.modules.encoders.class_embedder.ClassEmbedder",
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "ldm.modules.encoders.clip.FrozenCLIPEmbedder",
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": (
        "ldm.modules.encoders.open_clip.FrozenOpenCLIPEmbedder"
    ),
    # Stability-AI/generative-models (sgm): SDXL configs
    "sgm.models.diffusion.DiffusionEngine": "ldm.models.diffusion.sgm.SGMDiffusionEngine",
    "sgm.modules.diffusionmodules.openaimodel.UNetModel": "ldm.modules.unet_sgm.SGMUNetModel",
    "sgm.models.autoencoder.AutoencoderKL": "ldm.models.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": "ldm.models.autoencoder.AutoencoderKL",
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": "ldm.modules.encoders.clip.FrozenCLIPEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder": (
        "ldm.modules.encoders.open_clip.FrozenOpenCLIPEmbedder"
    ),
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": (
        "ldm.modules.encoders.open_clip.FrozenOpenCLIPEmbedder2"
    ),
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": (
        "ldm.modules.encoders.size_embedder.ConcatTimestepEmbedderND"
    ),
    "sgm.modules.encoders.modules.IdentityEncoder": "ldm.modules.encoders.base.IdentityEncoder",
    "sgm.modules.encoders.modules.ClassEmbedder": (
        "ldm.modules.encoders.class_embedder.ClassEmbedder"
    ),
    "sgm.lr_scheduler.LambdaLinearScheduler": "ldm.lr_scheduler.LambdaLinearScheduler",
    "sgm.lr_scheduler.LambdaWarmUpCosineScheduler": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler",
    "sgm.modules.ema.LitEma": "ldm.ema.LitEma",
}

FIRST_STAGE_SENTINEL = "__is_first_stage__"
UNCONDITIONAL_SENTINEL = "__is_unconditional__"


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts / lists (other values unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


class ConfigError(ValueError):
    """A user mistake in a config: the message names the key path, the problem and the fix."""


class DataKeyError(ConfigError, KeyError):
    """A batch without the key the model reads (``first_stage_key``, an embedder's input key):
    a config mistake (exit 2 from the commands) that is also a ``KeyError``."""

    __str__ = BaseException.__str__  # the message as written, not KeyError's quoted repr


class MissingPathError(ConfigError, FileNotFoundError):
    """A file or folder a config names that is not there: a config mistake (exit 2 from the
    commands) that is also a ``FileNotFoundError``."""

    __str__ = BaseException.__str__


# id(sub-config object) -> (object, key path), so nested instantiate_from_config calls made from
# inside constructors know where in the user's config they are. Entries live only while the
# constructor that registered them runs (ids are reused after garbage collection).
_CONFIG_PATHS: dict[int, tuple[Any, str]] = {}


def _is_mapping(obj: Any) -> bool:
    if isinstance(obj, Mapping):
        return True
    try:
        from omegaconf import DictConfig

        return isinstance(obj, DictConfig)
    except ImportError:  # pragma: no cover - omegaconf is a runtime dependency
        return False


def config_path_of(config: Any, default: str = "") -> str:
    """Key path of a (sub-)config in the user's file, e.g. ``model.params.unet_config``."""
    entry = _CONFIG_PATHS.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    full_key = getattr(config, "_get_full_key", None)
    if callable(full_key):
        try:
            key = full_key(None)
            if key:
                return str(key)
        except Exception:  # noqa: BLE001 - best effort only
            pass
    return default


def _register_paths(obj: Any, path: str, added: list[int]) -> None:
    """Remember the key path of every nested mapping/list under ``obj`` (ids appended to ``added``)."""
    if _is_mapping(obj):
        if id(obj) not in _CONFIG_PATHS:
            _CONFIG_PATHS[id(obj)] = (obj, path)
            added.append(id(obj))
        for key in list(obj.keys()):
            try:
                child = obj[key]
            except Exception:  # noqa: BLE001 - interpolation errors surface later
                continue
            _register_paths(child, f"{path}.{key}" if path else str(key), added)
    elif isinstance(obj, list | tuple) or type(obj).__name__ == "ListConfig":
        for i, child in enumerate(obj):
            _register_paths(child, f"{path}[{i}]", added)


def resolve_target(target: str) -> str:
    """Map a legacy target path to ours (identity when not in :data:`LEGACY_TARGETS`)."""
    return LEGACY_TARGETS.get(target, target)


def get_obj_from_str(string: str, reload: bool = False, path: str = "") -> Any:
    """Import ``package.module.Name`` (legacy paths go through the alias table)."""
    resolved = resolve_target(string)
    where = f"{path}.target: " if path else ""
    module_name, _, cls_name = resolved.rpartition(".")
    if not module_name:
        raise ConfigError(f"{where}'{string}' is not a dotted path like 'package.module.Class'.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # distinguish "module missing" from an import error inside an existing module
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            hint = did_you_mean(string, list(LEGACY_TARGETS))
            raise ConfigError(
                f"{where}cannot import module '{module_name}' for target '{string}'"
                f"{' (resolved to ' + resolved + ')' if resolved != string else ''}."
                f"{hint} Check the spelling, or install the package that provides it."
            ) from err
        raise
    if reload:
        module = importlib.reload(module)
    if not hasattr(module, cls_name):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(
            f"{where}module '{module_name}' has no attribute '{cls_name}'.{did_you_mean(cls_name, names)}"
        )
    return getattr(module, cls_name)


#: keys that sit beside ``target`` / ``params`` of the model node, not inside ``params``
MODEL_NODE_KEYS = ("base_learning_rate",)


def misplaced_hint(key: str) -> str:
    """`` It belongs at model.<key> ...`` for a model-node key put under params, else ''."""
    if key not in MODEL_NODE_KEYS:
        return ""
    return (
        f" '{key}' is not a constructor parameter: it belongs at model.{key} (beside "
        f"model.target and model.params), e.g. the override model.{key}=1e-5."
    )


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the candidate closest to ``word`` (difflib ratio >= 0.6), else
    an empty string; appended to error messages about misspelt names."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def accepts_parameter(target: str, name: str) -> bool | None:
    """Whether ``target``'s constructor takes ``name`` (following ``**kwargs`` up the MRO);
    None when that cannot be told (import error, no signature, ``**kwargs`` to the end)."""
    try:
        cls = get_obj_from_str(target)
    except Exception:  # noqa: BLE001 - an unimportable target is reported when it is built
        return None
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__init__ if isinstance(klass, type) else klass
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return None
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return None


def _check_params(cls: Any, params: Mapping[str, Any], path: str) -> None:
    """Validate parameter names against the constructor's signature."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    accepted = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    names = [n for n, p in accepted.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    cls_name = getattr(cls, "__name__", str(cls))
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"{path}.params.{key}: {cls_name} has no parameter '{key}'"
                f"{did_you_mean(str(key), names)}.{misplaced_hint(str(key))} Accepted "
                f"parameters: {', '.join(names)}."
            )
    missing = [
        n
        for n, p in accepted.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n not in params
    ]
    if missing:
        raise ConfigError(
            f"{path}.params: {cls_name} needs parameter(s) {', '.join(repr(m) for m in missing)}, "
            f"which the config does not give. Add them under '{path}.params'."
        )


def instantiate_from_config(config: Any, **extra_kwargs: Any) -> Any:
    """Build ``target(**params, **extra_kwargs)`` from a ``{target, params}`` config.

    The sentinels ``__is_first_stage__`` and ``__is_unconditional__`` are not buildable here; the
    diffusion model interprets them (as in CompVis). A plain ``str``/``None`` config is an error.
    """
    path = config_path_of(config, default="<config>")
    if isinstance(config, str) and config in (FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL):
        raise ConfigError(
            f"{path}: the sentinel '{config}' is interpreted by LatentDiffusion "
            "(first_stage_config / cond_stage_config) and cannot be instantiated on its own."
        )
    if not _is_mapping(config):
        raise ConfigError(
            f"{path}: expected a mapping with 'target' and optional 'params', "
            f"found {type(config).__name__}: {config!r}."
        )
    if "target" not in config:
        raise ConfigError(
            f"{path}: expected key 'target' (a dotted class path) next to 'params'; "
            f"found keys {sorted(map(str, config.keys()))}."
        )
    cls = get_obj_from_str(str(config["target"]), path=path)
    params = config.get("params", None)
    if params is None:
        params = {}
    if not _is_mapping(params):
        raise ConfigError(
            f"{path}.params: expected a mapping of constructor arguments, "
            f"found {type(params).__name__}: {params!r}."
        )
    kwargs = {str(k): params[k] for k in params.keys()}
    kwargs.update(extra_kwargs)
    _check_params(cls, kwargs, path)
    added: list[int] = []
    _register_paths(kwargs, f"{path}.params", added)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{path}: building {getattr(cls, '__name__', cls)} failed: {err}. "
            f"Check the values under '{path}.params'."
        ) from err
    finally:
        for key in added:
            _CONFIG_PATHS.pop(key, None)


def count_params(model: Any, verbose: bool = False) -> int:
    """Number of parameters of ``model`` (logged when ``verbose``)."""
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1e-6)
    return total


def exists(x: Any) -> bool:
    """``x is not None`` (CompVis helper)."""
    return x is not None


def default(val: Any, d: Any) -> Any:
    """``val`` if not None, else ``d`` (called when callable)."""
    if val is not None:
        return val
    return d() if callable(d) else d


def file_hash(path: str | os.PathLike, n: int = 10) -> str:
    """Short sha256 of a file (or of a folder's model_index.json + weights), for image metadata."""
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:n]
