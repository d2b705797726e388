"""Messages for a LoRA file that does not fit a model: names grouped by block, shapes side by side."""

from __future__ import annotations

import re
from collections import defaultdict

_GROUP = re.compile(r"^(.*?\d+)(?=[._]|$)")
_SHOW = 8


def group_name(name: str) -> str:
    """The block a module name belongs to: the name up to its first number
    (`lora_unet_down_blocks_0_attentions_0_proj_in` -> `lora_unet_down_blocks_0`)."""
    m = _GROUP.match(name)
    return m.group(1) if m else name


def grouped(names: list[str]) -> str:
    """`group (n modules, e.g. name)` lines for a list of names."""
    groups: dict[str, list[str]] = defaultdict(list)
    for n in sorted(names):
        groups[group_name(n)].append(n)
    lines = [
        f"  {g}: {len(ns)} module{'s' if len(ns) > 1 else ''}, e.g. {ns[0]}"
        for g, ns in list(groups.items())[:_SHOW]
    ]
    if len(groups) > _SHOW:
        lines.append(f"  ... and {len(groups) - _SHOW} more groups")
    return "\n".join(lines)


def shape_lines(problems: list[str]) -> str:
    """The first shape problems, one a line."""
    lines = [f"  {p}" for p in problems[:_SHOW]]
    if len(problems) > _SHOW:
        lines.append(f"  ... and {len(problems) - _SHOW} more")
    return "\n".join(lines)
