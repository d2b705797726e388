"""diffusers / peft LoRA state dicts: `<component>.<module path>.lora_A.weight` (down) and
`.lora_B.weight` (up), components `unet`, `text_encoder`, `text_encoder_2`.

Read also: peft's `base_model.model.` prefix and adapter-named keys (`.lora_A.default.weight`), the
older diffusers names (`attn1.processor.to_q_lora.down.weight`, `to_out_lora`, `.lora.down.weight`,
`.lora_linear_layer.down.weight`), `<module>.alpha` keys, and the `lora_adapter_metadata` header
(diffusers >= 0.34: peft `LoraConfig` fields per component, `unet.lora_alpha`, `unet.alpha_pattern`,
...). Scaling follows peft: alpha from `alpha_pattern` (regex `(.*\\.)?(<pattern>)$` on the module
name) else `lora_alpha` (peft's default 8), over the rank (`sqrt(rank)` with `use_rslora`); without
metadata or alpha keys, alpha = rank. Written files carry the metadata, so diffusers loads them
with the same scaling.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

from torch import Tensor

from ldm.adapters.lora_weights import LoraError, LoraModule

METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_PEFT_DEFAULT_ALPHA = 8.0
# (suffix regex, role) for the key forms after the module path
_ROLES = [
    (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_]+)?\.weight$"), "up"),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.down\.weight$"), "down"),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.up\.weight$"), "up"),
    (re.compile(r"_lora\.down\.weight$"), "old_down"),  # attn processor: `.to_q_lora.down.weight`
    (re.compile(r"_lora\.up\.weight$"), "old_up"),
    (re.compile(r"\.alpha$"), "alpha"),
]
# old attention-processor names -> module names, for the U-Net and the CLIP text encoders
_OLD_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


#: a CLIP text model's own module names: transformers 5's `CLIPTextModel` has no `text_model.`
#: level, so the files peft / diffusers write with it name `text_encoder.encoder.layers...`
_TEXT_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")


def _component(module: str) -> str:
    """`<component>.<path>` with the text encoders' paths under `text_model.` (as transformers 4
    and the SD files name them); a bare path gets its component from its first name."""
    head, _, rest = module.partition(".")
    if head not in COMPONENTS:
        text = module.startswith(("text_model.", *_TEXT_ROOTS))
        head, rest = ("text_encoder" if text else "unet"), module
    if head != "unet" and rest.startswith(_TEXT_ROOTS):
        rest = "text_model." + rest
    return f"{head}.{rest}"


def split_key(key: str, source: str) -> tuple[str, str]:
    """A file key -> (`<component>.<module path>`, 'down' | 'up' | 'alpha')."""
    k = key.replace("base_model.model.", "")
    if k.endswith(".lora_B.bias"):
        raise LoraError(
            f"{source}: `{key}` is a LoRA bias (peft `lora_bias=True`), which changes biases as "
            "well as weights; only weight LoRAs are supported."
        )
    for pattern, role in _ROLES:
        m = pattern.search(k)
        if m is None:
            continue
        module = k[: m.start()].replace(".processor", "")
        if role.startswith("old_"):  # `<attn>.to_q_lora` -> `<attn>.to_q` / `self_attn.q_proj`
            head, _, old = module.rpartition(".")
            table = _OLD_TEXT if "text_model." in module else _OLD_UNET
            if old not in table:
                break
            module, role = f"{head}.{table[old]}", role[4:]
        return _component(module), role
    raise LoraError(
        f"{source}: key `{key}` is not a diffusers/peft LoRA entry (expected "
        "`<module>.lora_A.weight`, `.lora_B.weight` or `.alpha`). Remove it or convert the file."
    )


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return None


def _metadata_alpha(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
    alpha = float(config.get("lora_alpha", _PEFT_DEFAULT_ALPHA) if alpha is None else alpha)
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha  # alpha / sqrt(r) scale


def component_configs(header: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` -> {component: peft LoraConfig fields}."""
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(raw).items():
        comp, _, field = key.partition(".")
        out.setdefault(comp, {})[field] = value
    return out


def read_diffusers(
    sd: dict[str, Tensor], header: dict[str, str], source: str
) -> dict[str, LoraModule]:
    """`<component>.<module path>` -> LoraModule, alphas from the header, `.alpha` keys or rank."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        module, role = split_key(key, source)
        parts.setdefault(module, {})[role] = value
    configs = component_configs(header)
    out = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "lora_A (down)" if "down" not in p else "lora_B (up)"
            raise LoraError(
                f"{source}: module `{module}` has no {missing}; the file is incomplete."
            )
        rank = int(p["down"].shape[0])
        comp, _, path = module.partition(".")
        if "alpha" in p:
            alpha: float | None = float(p["alpha"].float().item())
        elif comp in configs:
            alpha = _metadata_alpha(configs[comp], path, rank)
        else:
            alpha = None
        out[module] = LoraModule(p["down"], p["up"], alpha)
    return out


def _config(modules: dict[str, LoraModule]) -> dict[str, Any]:
    """peft LoraConfig fields for one component's modules (paths without the component)."""
    ranks = {m: mod.rank for m, mod in modules.items()}
    alphas = {m: float(mod.rank if mod.alpha is None else mod.alpha) for m, mod in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{re.escape(m)}": v for m, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(m)}": v for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(modules),
        "use_dora": False,
        "lora_bias": False,
    }


def write_diffusers(named: dict[str, LoraModule]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict, header metadata) of `<component>.<module path>` -> LoraModule."""
    sd: dict[str, Tensor] = {}
    per_comp: dict[str, dict[str, LoraModule]] = {}
    for name, m in named.items():
        sd[f"{name}.lora_A.weight"] = m.down.contiguous()
        sd[f"{name}.lora_B.weight"] = m.up.contiguous()
        comp, _, path = name.partition(".")
        per_comp.setdefault(comp, {})[path] = m
    packed = {
        f"{comp}.{field}": value
        for comp, modules in per_comp.items()
        for field, value in _config(modules).items()
    }
    return sd, {METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
