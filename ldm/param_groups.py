"""Parameters chosen by name: per-group learning rates and freezing (``optimizer_config``).

Names are those of ``module.named_parameters()`` on the whole LightningModule
(``model.diffusion_model.input_blocks.0.0.weight``, ``cond_stage_model.transformer...``,
``conditioner.embedders.1...``, ``logvar``); a pattern matches a name with ``re.search``, so anchor
it with ``^`` to match a prefix. A parameter reachable under several names matches if any matches.

    param_groups:                     # first match wins; the rest form the base group
      - {pattern: "^cond_stage_model\\.", lr: 1.0e-6}      # an absolute learning rate
      - {pattern: "^conditioner\\.", lr_scale: 0.1}        # relative to the base learning rate
      - {pattern: "norm|bias", weight_decay: 0.0}          # any other optimizer option
    freeze: ["^model\\.diffusion_model\\.input_blocks\\.0\\."]
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ldm.util import ConfigError, did_you_mean

__all__ = [
    "GroupRule",
    "compile_pattern",
    "freeze_matching",
    "param_names",
    "parse_group_rules",
    "split_into_groups",
]

BASE_GROUP = "base"


@dataclass(frozen=True)
class GroupRule:
    """One ``param_groups`` entry: the parameters whose name matches ``pattern``."""

    pattern: re.Pattern[str]
    where: str  # "optimizer_config.param_groups[i]", for messages
    lr: float | None = None
    lr_scale: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def learning_rate(self, base_lr: float) -> float:
        if self.lr is not None:
            return self.lr
        return base_lr * (self.lr_scale if self.lr_scale is not None else 1.0)


def compile_pattern(pattern: Any, where: str) -> re.Pattern[str]:
    """A regular expression from the config, or a ConfigError naming its key."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where}: expected a regular expression string, found {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(
            f"{where}: {pattern!r} is not a valid regular expression ({err})."
        ) from None


def _number(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number >= 0:
        raise ConfigError(f"{where}: expected a non-negative number, found {value!r}.")
    return number


def parse_group_rules(entries: Any, options: Collection[str]) -> tuple[GroupRule, ...]:
    """``param_groups`` -> rules; ``options``: the optimizer keyword arguments a group may set."""
    if entries is None:
        return ()
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ConfigError(
            "optimizer_config.param_groups: expected a list of {pattern, lr | lr_scale, ...}, "
            f"found {entries!r}."
        )
    rules = []
    allowed = ("pattern", "lr", "lr_scale", "name", *sorted(options))
    for i, entry in enumerate(entries):
        where = f"optimizer_config.param_groups[{i}]"
        if not isinstance(entry, Mapping) or "pattern" not in entry:
            raise ConfigError(f"{where}: expected a mapping with a `pattern`, found {entry!r}.")
        for key in entry:
            if key not in allowed:
                raise ConfigError(
                    f"{where}: unknown key '{key}'{did_you_mean(str(key), allowed)}; a group takes "
                    f"{list(allowed)}."
                )
        if "lr" in entry and "lr_scale" in entry:
            raise ConfigError(
                f"{where}: give either lr (absolute) or lr_scale (times the base learning rate), "
                "not both."
            )
        rules.append(
            GroupRule(
                pattern=compile_pattern(entry["pattern"], f"{where}.pattern"),
                where=where,
                lr=_number(entry["lr"], f"{where}.lr") if "lr" in entry else None,
                lr_scale=(
                    _number(entry["lr_scale"], f"{where}.lr_scale") if "lr_scale" in entry else None
                ),
                options={k: v for k, v in entry.items() if k in options},
                name=str(entry["name"]) if "name" in entry else None,
            )
        )
    return tuple(rules)


def param_names(module: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in ``module`` (shared modules give several)."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _matches(pattern: re.Pattern[str], names: Sequence[str]) -> bool:
    return any(pattern.search(n) for n in names)


def _summary(names: Sequence[str], depth: int = 2, top: int = 8) -> str:
    """'model.diffusion_model.* (686), logvar (1)': what names there are, for messages."""
    counts = Counter(
        ".".join(n.split(".")[:depth]) + (".*" if n.count(".") >= depth else "") for n in names
    )
    parts = [f"{k} ({v})" for k, v in counts.most_common(top)]
    return ", ".join(parts) + (", ..." if len(counts) > top else "") if parts else "none"


def _no_match_message(
    params: Sequence[nn.Parameter],
    names: Mapping[int, Sequence[str]],
    rules: Sequence[GroupRule],
    i: int,
) -> str:
    rule = rules[i]
    own = [names.get(id(p), ["<unnamed>"]) for p in params]
    shadowing = [
        r.where
        for r in rules[:i]
        if any(_matches(r.pattern, n) and _matches(rule.pattern, n) for n in own)
    ]
    trained = {id(p) for p in params}
    untrained = [n for i, n in names.items() if i not in trained and _matches(rule.pattern, n)]
    if shadowing:
        why = f"what it matches was taken by the earlier {', '.join(shadowing)} (first match wins)"
    elif untrained:
        why = (
            f"the {len(untrained)} parameters it matches ({_summary([n[0] for n in untrained])}) "
            "do not train (frozen by the model, e.g. cond_stage_trainable: false or the encoder's "
            "own freeze, or by optimizer_config.freeze)"
        )
    else:
        why = f"the trained parameters are {_summary([n[0] for n in own])}"
    return (
        f"{rule.where}.pattern '{rule.pattern.pattern}' matches no trained parameter: {why}. "
        "Fix the pattern (re.search on the full name) or remove the group."
    )


def split_into_groups(
    params: Sequence[nn.Parameter],
    names: Mapping[int, Sequence[str]],
    rules: Sequence[GroupRule],
    base_lr: float,
) -> list[dict[str, Any]]:
    """Optimizer param groups: the unmatched parameters first (the base group at ``base_lr``:
    Lightning's ``lr_abs`` log reads group 0), then one group per rule in order."""
    claimed: list[list[nn.Parameter]] = [[] for _ in rules]
    base: list[nn.Parameter] = []
    for p in params:
        own = names.get(id(p), ["<unnamed>"])
        for i, rule in enumerate(rules):
            if _matches(rule.pattern, own):
                claimed[i].append(p)
                break
        else:
            base.append(p)
    for i, got in enumerate(claimed):
        if not got:
            raise ConfigError(_no_match_message(params, names, rules, i))
    groups = []
    if base:
        groups.append({"params": base, "lr": base_lr, "name": BASE_GROUP})
    for i, (rule, got) in enumerate(zip(rules, claimed)):
        group = {"params": got, **rule.options, "lr": rule.learning_rate(base_lr)}
        group["name"] = rule.name or f"group{i}"
        groups.append(group)
    return groups


def freeze_matching(module: nn.Module, patterns: Sequence[Any]) -> list[str]:
    """Set ``requires_grad=False`` on the parameters whose name matches any pattern; returns the
    frozen names. A pattern that matches no parameter is a ConfigError."""
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise ConfigError(
            f"optimizer_config.freeze: expected a list of regular expressions, found {patterns!r}."
        )
    compiled = [compile_pattern(p, f"optimizer_config.freeze[{i}]") for i, p in enumerate(patterns)]
    named = list(module.named_parameters(remove_duplicate=False))
    frozen: list[str] = []
    for i, pattern in enumerate(compiled):
        hits = [(n, p) for n, p in named if pattern.search(n)]
        if not hits:
            raise ConfigError(
                f"optimizer_config.freeze[{i}] '{pattern.pattern}' matches no parameter; the "
                f"model has {_summary([n for n, _ in named])}. Fix the pattern (re.search on the "
                "full name) or remove it."
            )
        for name, p in hits:
            if p.requires_grad:
                p.requires_grad_(False)
            frozen.append(name)
    return sorted(set(frozen))
