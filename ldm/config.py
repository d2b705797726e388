"""Load and merge CompVis-style YAML configs, apply command-line overrides, explain mistakes.

Configs merge left to right (``OmegaConf.merge``), then the command-line overrides. Every key
remembers the file (or ``command line``) that set it last, so an error names the file, the key
path, what was expected and what was found, and suggests a fix (:func:`ldm.util.did_you_mean` for misspellings).
Override forms: ``a.b=1``, ``--a.b=1``, ``--a.b 1``; ``trainer.x`` means ``lightning.trainer.x``,
and a bare Trainer argument (``--max_steps 20``, legacy ``--gpus 0,``) too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.config_ranges import (
    NO_ANNOTATION,
    describe_annotation,
    examples,
    fits_annotation,
    parameter_annotation,
)
from ldm.util import ConfigError, accepts_parameter, did_you_mean

logger = logging.getLogger(__name__)

SECTIONS = ("model", "data", "lightning")
LIGHTNING_SECTIONS = ("trainer", "callbacks", "logger", "modelcheckpoint", "strategy", "profiler")
CLI_SOURCE = "command line"
_KEY_RE = re.compile(r"^[A-Za-z_][\w\-]*(\[\d+\])*(\.[\w\-]+(\[\d+\])*)*$")
_NUMBER_RE = re.compile(r"^-(\d|\.\d)")


@dataclass
class ConfigSources:
    """Key path -> the file (or ``command line``) that set it last."""

    by_key: dict[str, str] = field(default_factory=dict)

    def record(self, cfg: Any, source: str, prefix: str = "") -> None:
        """Remember ``source`` for every key path under ``cfg``."""
        if isinstance(cfg, DictConfig):
            for key in cfg.keys():
                path = f"{prefix}.{key}" if prefix else str(key)
                self.by_key[path] = source
                self.record(cfg._get_node(key), source, path)  # type: ignore[arg-type]
        elif isinstance(cfg, ListConfig):
            for i in range(len(cfg)):
                path = f"{prefix}[{i}]"
                self.by_key[path] = source
                self.record(cfg._get_node(i), source, path)

    def forget(self, path: str) -> None:
        """Drop ``path`` and the keys under it (a replaced component)."""
        for key in [k for k in self.by_key if k == path or k.startswith((f"{path}.", f"{path}["))]:
            del self.by_key[key]

    def of(self, path: str) -> str | None:
        """Source of ``path`` or of its longest recorded prefix."""
        probe = path
        while probe:
            if probe in self.by_key:
                return self.by_key[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return None

    def where(self, path: str) -> str:
        """`` (set in FILE)`` for messages, or an empty string when unknown."""
        src = self.of(path)
        return f" (set in {src})" if src else ""


def load_yaml(path: str | Path) -> DictConfig:
    """Load one YAML config; a missing file or a YAML syntax error is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        siblings = [p.name for p in path.parent.glob("*.yaml")] if path.parent.is_dir() else []
        raise ConfigError(
            f"config file '{path}' does not exist{did_you_mean(path.name, siblings)}. "
            "Pass an existing YAML file to -b/--base."
        )
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and OmegaConf errors carry the line number
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
    if cfg is None:
        return OmegaConf.create()
    if not isinstance(cfg, DictConfig):
        raise ConfigError(
            f"{path}: expected a mapping with sections {', '.join(SECTIONS)} at the top level, "
            f"found a {type(cfg).__name__}."
        )
    return cfg


def normalize_key(key: str, trainer_args: Iterable[str] = ()) -> str:
    """``trainer.x`` -> ``lightning.trainer.x``; a bare Trainer argument ``x`` -> the same."""
    if key.startswith("trainer.") or key == "trainer":
        return f"lightning.{key}"
    if "." not in key and key in set(trainer_args):
        return f"lightning.trainer.{key}"
    return key


def split_cli(
    argv: Sequence[str],
    own_flags: Iterable[str],
    trainer_args: Iterable[str] = (),
    value_flags: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """Separate overrides (``a.b=1``, ``--a.b=1``, ``--a.b 1``) from the launcher's own flags.

    Returns ``(argv for argparse, dotlist overrides)``. A flag with no value means ``true``. The
    token after one of ``value_flags`` is that flag's value even when it holds ``=`` (``-r
    logs/run/checkpoints/epoch=000001-step=000100.ckpt``).
    """
    own = set(own_flags)
    trainer = set(trainer_args)
    takes_value = set(value_flags)
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in takes_value and i + 1 < len(argv):
            rest += [tok, argv[i + 1]]
            i += 2
            continue
        if not tok.startswith("-") and "=" in tok:
            key, _, val = tok.partition("=")
            if not _KEY_RE.match(key):
                raise ConfigError(
                    f"command line: '{tok}' is not an override of the form key.path=value."
                )
            overrides.append(f"{normalize_key(key, trainer)}={val}")
        elif tok.startswith("--") and len(tok) > 2:
            key, eq, val = tok[2:].partition("=")
            if f"--{key}" in own or not ("." in key or key in trainer):
                rest.append(tok)
            else:
                if not _KEY_RE.match(key):
                    raise ConfigError(f"command line: '{tok}' is not a valid key path.")
                if not eq:
                    nxt = argv[i + 1] if i + 1 < len(argv) else None
                    if nxt is not None and (not nxt.startswith("-") or _NUMBER_RE.match(nxt)):
                        val, i = nxt, i + 1
                    else:
                        val = "true"
                overrides.append(f"{normalize_key(key, trainer)}={val}")
        else:
            rest.append(tok)
        i += 1
    return rest, overrides


def _type_name(value: Any) -> str:
    if isinstance(value, DictConfig):
        return "a mapping"
    if isinstance(value, ListConfig):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return "a string"


def _compatible(old: Any, new: Any) -> bool:
    """Whether an override value ``new`` may replace ``old`` (numbers stay numbers, etc.)."""
    if old is None or new is None:
        return True
    if isinstance(old, bool):
        return isinstance(new, bool)
    if isinstance(old, int | float):
        return isinstance(new, int | float) and not isinstance(new, bool)
    if isinstance(old, DictConfig):
        return isinstance(new, DictConfig)
    if isinstance(old, ListConfig):
        return isinstance(new, ListConfig)
    return not isinstance(new, DictConfig | ListConfig)


def _check_parameter_value(key: str, target: str, value: Any) -> bool:
    """Check an override of a constructor parameter against its annotation; False when there is
    no annotation to read (the caller falls back to comparing with the current value)."""
    name = key.rsplit(".", 1)[-1]
    ann, written = parameter_annotation(target, name)
    if ann is NO_ANNOTATION:
        return False
    if isinstance(value, str) and value.startswith("${"):
        return True  # an interpolation: its type is known once resolved
    fits = fits_annotation(ann, value)
    if fits is None:
        return False
    if not fits and value is not None:  # null: the constructor's default / "off", as before
        cls = target.rsplit(".", 1)[-1]
        expected = describe_annotation(ann)
        fixes = (
            " or ".join(f"'{key}={ex}'" if ex[0] in "{[" else f"{key}={ex}" for ex in examples(ann))
            or f"{key}=<{expected}>"
        )
        raise ConfigError(
            f"command line: '{key}' expects {expected} ({cls}'s parameter {name}: {written}), "
            f"found {_type_name(value)} {value!r}. Fix: {fixes} (values are YAML)."
        )
    return True


def _child(node: DictConfig | ListConfig, key: str | int) -> Any:
    """Child node without resolving interpolations (sub-configs stay configs)."""
    child = node._get_node(key)
    return child if isinstance(child, DictConfig | ListConfig) else child._value()  # type: ignore[union-attr]


def _params_target(parent: Any, walked: str) -> str | None:
    """The ``target`` whose constructor receives the keys under ``walked`` (a ``params`` node)."""
    if not (walked == "params" or walked.endswith(".params")) or not isinstance(parent, DictConfig):
        return None
    target = parent._get_node("target") if "target" in parent.keys() else None
    value = target._value() if target is not None else None  # type: ignore[union-attr]
    return value if isinstance(value, str) and not value.startswith("${") else None


def _is_constructor_parameter(parent: Any, walked: str, name: str) -> bool:
    """True when ``walked`` is the ``params`` of a ``{target, params}`` node whose target takes ``name``."""
    target = _params_target(parent, walked)
    return target is not None and accepts_parameter(target, name) is True


def check_override(base: DictConfig, key: str, value: Any, sources: ConfigSources) -> None:
    """Reject a misspelt key (close to an existing one) or a value of the wrong type."""
    if key.startswith("lightning.trainer."):
        return  # Trainer arguments are checked by ldm.trainer_setup against the Trainer signature
    parts = key.replace("[", ".[").split(".")
    node: Any = base
    parent: Any = None
    walked = ""
    target = None  # the class whose constructor parameter the key is, when it is one
    for i, part in enumerate(parts):
        if part.startswith("["):
            walked += part
            idx = int(part[1:-1])
            if not isinstance(node, ListConfig) or idx >= len(node):
                return  # new list entries: nothing to compare against
            node = _child(node, idx)
            continue
        path = f"{walked}.{part}" if walked else part
        if i == len(parts) - 1:
            target = _params_target(parent, walked)
        if not isinstance(node, DictConfig):
            if node is not None and not (walked.startswith("lightning.trainer")):
                raise ConfigError(
                    f"command line: '{key}' sets a key under '{walked}', but '{walked}' is "
                    f"{_type_name(node)} ({node!r}){sources.where(walked)}, not a mapping. "
                    f"Set '{walked}=...' itself, or fix the key path."
                )
            return
        if part not in node.keys():  # `in node` is False for a missing value (???)
            existing = [str(k) for k in node.keys()]
            hint = did_you_mean(part, existing)
            if hint and _is_constructor_parameter(parent, walked, part):
                hint = ""  # e.g. use_scale_shift_norm next to use_spatial_transformer
            if hint:
                raise ConfigError(
                    f"command line: unknown key '{path}'{hint}. "
                    f"Keys under '{walked or '<top level>'}': {', '.join(existing)}. "
                    "Fix the spelling (a new key is only accepted when it is not a near-miss)."
                )
            logger.info("command line adds new key '%s'", path)
            if target is not None:
                _check_parameter_value(key, target, value)
            return
        parent, node = node, _child(node, part)
        walked = path
    if target is not None and _check_parameter_value(key, target, value):
        return  # checked against the constructor's annotation instead of the current value
    if node == "???":
        return  # a required value (MISSING) being supplied: any type
    if not _compatible(node, value):
        raise ConfigError(
            f"command line: '{key}' expects {_type_name(node)} like the current value "
            f"{node!r}{sources.where(key)}, found {_type_name(value)} {value!r}. "
            f"Fix: {key}=<{_type_name(node).split()[-1]}>."
        )


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """Dotlist -> config; a token without ``=`` is an error explaining the two accepted forms."""
    for tok in overrides:
        if "=" not in tok:
            raise ConfigError(
                f"command line: '{tok}' has no value. Use key.path=value or --key.path value."
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        shown = overrides[0] if len(overrides) == 1 else list(overrides)
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"command line: cannot parse the override {shown!r}: {reason}. Values are YAML: "
            "quote text with special characters, e.g. key='{a'."
        ) from err


def _drop_replaced_components(base: DictConfig, new: DictConfig, path: str = "") -> None:
    """Where a later file names a different ``target`` for a component, its ``params`` replace the
    earlier ones instead of merging into them (the old class's parameters do not apply)."""
    for key in new.keys():
        child = new._get_node(key)
        if not isinstance(child, DictConfig) or key not in base.keys():
            continue
        old = base._get_node(key)
        if not isinstance(old, DictConfig):
            continue
        if "target" in child.keys() and "target" in old.keys() and child.target != old.target:
            base[key] = OmegaConf.create({})
            logger.info(
                "%s%s: target changes from %s to %s; its params are replaced, not merged",
                f"{path}." if path else "",
                key,
                old.target,
                child.target,
            )
            continue
        _drop_replaced_components(old, child, f"{path}.{key}" if path else str(key))


def _targets_in(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Component path -> the ``target`` ``cfg`` gives it (``a.b.target=X`` -> ``{"a.b": X}``)."""
    found: dict[str, Any] = {}
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            child = cfg._get_node(key)
            if key == "target" and prefix:
                found[prefix] = child._value()  # type: ignore[union-attr]
            path = f"{prefix}.{key}" if prefix else str(key)
            found.update(_targets_in(child, path))
    elif isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            found.update(_targets_in(cfg._get_node(i), f"{prefix}[{i}]"))
    return found


def _drop_retargeted(merged: DictConfig, overrides: Sequence[str], sources: ConfigSources) -> None:
    """An override naming a different ``target`` for a component drops the ``params`` that the
    files gave it, as a later file does (params set on the same command line, before or after the
    target, are kept: the overrides are applied afterwards)."""
    targets: dict[str, Any] = {}
    for tok in overrides:
        if "=" in tok:
            targets.update(_targets_in(parse_overrides([tok])))
    for path, new in targets.items():
        node = OmegaConf.select(merged, path, throw_on_resolution_failure=False)
        if not isinstance(node, DictConfig) or "target" not in node.keys():
            continue
        old = node._get_node("target")._value()  # type: ignore[union-attr]
        if old == new or "params" not in node.keys():
            continue
        del node["params"]  # other keys (model.base_learning_rate) stay
        sources.forget(f"{path}.params")
        logger.info(
            "%s: target changes from %s to %s; its params are replaced, not merged", path, old, new
        )


def merge_configs(
    paths: Sequence[str | Path], overrides: Sequence[str] = ()
) -> tuple[DictConfig, ConfigSources]:
    """Merge YAML files left to right, then the overrides; returns the config and its sources."""
    sources = ConfigSources()
    merged = OmegaConf.create()
    for p in paths:
        cfg = load_yaml(p)
        check_sections(cfg, str(p))
        sources.record(cfg, str(p))
        try:
            _drop_replaced_components(merged, cfg)
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{p}: cannot merge into the configs before it: {err}") from err
    _drop_retargeted(merged, overrides, sources)
    for tok in overrides:
        key, _, _ = tok.partition("=")
        single = parse_overrides([tok])
        value = OmegaConf.select(single, key)
        check_override(merged, key, value, sources)
        try:
            merged = OmegaConf.merge(merged, single)
        except OmegaConfBaseException as err:
            raise ConfigError(
                f"command line: '{tok}' cannot replace the value{sources.where(key)}: {err}"
            ) from err
        sources.record(single, CLI_SOURCE)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            "; ".join(
                f"{k}: a required value (???){sources.where(k)} was not given" for k in missing
            )
            + ". Pass it on the command line, e.g. "
            + " ".join(f"{k}=..." for k in missing)
            + "."
        )
    return merged, sources


def check_sections(cfg: DictConfig, source: str) -> None:
    """Top-level keys must be model/data/lightning; a near-miss is an error with a suggestion."""
    for key in cfg.keys():
        key = str(key)
        if key in SECTIONS:
            continue
        hint = did_you_mean(key, SECTIONS)
        if hint:
            raise ConfigError(
                f"{source}: unknown top-level section '{key}'{hint}. "
                f"Sections are {', '.join(SECTIONS)}."
            )
        logger.warning("%s: top-level key '%s' is not one of %s; kept.", source, key, SECTIONS)


def require(config: DictConfig, path: str, sources: ConfigSources, hint: str) -> Any:
    """Value at ``path``; a missing key is an error naming the files given and ``hint``."""
    value = OmegaConf.select(config, path, default=None)
    if value is None:
        files = sorted({s for s in sources.by_key.values() if s != CLI_SOURCE})
        raise ConfigError(
            f"missing '{path}' in the merged config (files: {', '.join(files) or 'none'}). {hint}"
        )
    return value


def explain(err: ConfigError, sources: ConfigSources) -> ConfigError:
    """Add the file that set the failing key to a :class:`ConfigError` from instantiation."""
    msg = str(err)
    m = re.match(r"^([\w\-.\[\]]+):", msg)
    if not m:
        return err
    where = sources.where(m.group(1))
    if not where or where in msg:
        return err
    return ConfigError(f"{m.group(1)}{where}:{msg[m.end() :]}")
