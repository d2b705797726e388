"""The engine's Conditioner, built from ``conditioner_config``:

    embedders:            # one: its weights are `cond_stage_model.*` (SD layout); several: `conditioner.embedders.N.*` (SDXL)
      - target: ldm.modules.encoders.clip.FrozenCLIPEmbedder   # or module: __is_first_stage__
        params: {...}
        input_key: caption    # the batch key it reads
        ucg_rate: 0.1         # caption dropout in training (classifier-free guidance)
        null: ""              # the raw "no condition" (default: "" for text, the null class)
        # config: {target, params}   (instead of target / params)
        is_trainable: false   # frozen (eval mode, no grad) unless true
        kind: crossattn       # crossattn | vector | concat | auto (each output by its ndim)
        zero_null: false      # "no condition" = a zero embedding (SDXL text), dropout zeroes it
        forward: encode       # the module's method to call (CompVis cond_stage_forward)
        input: text           # how the batch entry is read: text (default) | class | image | tensor
    concat:               # inpainting: [mask, E(masked image)] concatenated to the input
      keys: [mask, masked_image]
      masked_image_key: masked_image
    num_timesteps_cond: 1 # CompVis: diffuse the condition with t (shortened schedule) when > 1

Raw inputs are read from a batch as CompVis data sets give them: captions as strings, class labels
as ints, images as B x H x W x C in [-1, 1], other tensors as they are. With several embedders the
outputs are assembled by kind (sgm's rule): cross-attention sequences concatenated along the
feature axis (c_crossattn), vectors along dim 1 (c_adm, the U-Net's ``y``), concat channels along
the channel axis (c_concat); the engine's ``conditioning_key`` routes them (e.g. crossattn-adm).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.engine.conditioner import NDIM_KINDS, ZERO_KEY, Conditioner, Embedder
from ldm.engine.frozen import freeze
from ldm.util import (
    FIRST_STAGE_SENTINEL,
    UNCONDITIONAL_SENTINEL,
    ConfigError,
    instantiate_from_config,
)

logger = logging.getLogger(__name__)

EMBEDDER_KEYS = (
    "target",
    "params",
    "module",
    "input_key",
    "ucg_rate",
    "null",
    "is_trainable",
    "kind",
    "forward",
    "config",
    "input",
    "zero_null",
)
INPUT_KINDS = ("text", "class", "image", "tensor")


def _first(xc: Any, n: int) -> Any:
    """The first n entries of a condition input (a batch dict: of each of its sequences)."""
    if isinstance(xc, Mapping):
        return {
            k: v[:n] if isinstance(v, torch.Tensor | list | tuple) else v for k, v in xc.items()
        }
    return xc[:n]


class EngineConditioner(Conditioner):
    """The Conditioner of a ``DiffusionEngine``: its module lives on the engine as
    ``cond_stage_model`` (the key layout of SD checkpoints)."""

    def __init__(
        self,
        engine: nn.Module,
        spec: Mapping[str, Any],
        concat: Mapping[str, Any] | None,
        num_timesteps_cond: int,
    ) -> None:
        self.engine = engine
        self.input_key = str(spec.get("input_key", "caption"))
        self.input_kind = input_kind(spec)
        self.trains = bool(spec.get("is_trainable", False))
        self.forward_name = spec.get("forward")
        self.concat_keys = tuple((concat or {}).get("keys", ()))
        self.masked_image_key = (concat or {}).get("masked_image_key", "masked_image")
        if self.concat_keys and self.masked_image_key not in self.concat_keys:
            raise ConfigError(
                f"masked_image_key '{self.masked_image_key}' must be one of concat keys "
                f"{self.concat_keys}."
            )
        if self.concat_keys and self.trains:
            raise ConfigError("inpainting (concat) models support frozen cond stages only.")
        null = spec["null"] if "null" in spec else self._default_null()
        embedders = [
            Embedder(
                self.input_key,
                self.encode_raw,
                kind=spec.get("kind", "crossattn"),
                ucg_rate=float(spec.get("ucg_rate", 0.0) or 0.0),
                null=null,
                is_trainable=self.trains,
            )
        ]
        if self.concat_keys:
            embedders.append(Embedder(self.concat_keys, self._encode_concat, kind="concat"))
        super().__init__(embedders, self._assemble)
        self.num_timesteps_cond = int(num_timesteps_cond)
        if self.num_timesteps_cond > engine.num_timesteps:
            raise ConfigError(
                f"num_timesteps_cond={self.num_timesteps_cond} exceeds timesteps="
                f"{engine.num_timesteps}."
            )
        if self.num_timesteps_cond > 1:  # CompVis cond_ids: the noise level of the condition
            t_all = engine.num_timesteps
            cond_ids = torch.full((t_all,), t_all - 1, dtype=torch.long)
            ids = torch.linspace(0, t_all - 1, self.num_timesteps_cond).round().long()
            cond_ids[: self.num_timesteps_cond] = ids
            engine.register_buffer("cond_ids", cond_ids)

    # -- raw inputs -> conditioning
    def _default_null(self) -> Any:
        """'No condition' by input kind: the empty prompt, the module's null class, else none."""
        return default_null(self.input_kind, self.engine.cond_stage_model)

    def encode_raw(self, c: Any) -> Any:
        """tau_theta(y) of raw inputs through the cond stage module."""
        return _call_module(self.engine.cond_stage_model, c, self.forward_name, self.engine.device)

    def raw_input(self, batch: Mapping[str, Any], x: torch.Tensor | None, bs: int | None) -> Any:
        """The raw condition of a batch: captions (list), class labels, or an image tensor."""
        key, engine = self.input_key, self.engine
        if key == engine.first_stage_key and x is not None:
            xc = x
        elif self.input_kind in ("class", "tensor") and _takes_batch(engine.cond_stage_model):
            xc = batch  # CompVis ClassEmbedder.forward takes the batch dict
        else:
            xc = read_entry(engine, batch, key, self.input_kind)
        return _first(xc, bs) if bs is not None else xc

    def batch_condition(
        self, batch: Mapping[str, Any], x: torch.Tensor | None, bs: int | None, encode: bool = True
    ) -> Any:
        """The conditioning of a training batch (raw when not ``encode``: a trainable embedder is
        run with gradients in the engine's ``forward``)."""
        xc = self.raw_input(batch, x, bs)
        c = self.encode_raw(xc) if encode else xc
        if bs is not None and isinstance(c, torch.Tensor | list):
            c = c[:bs]
        if not self.concat_keys:
            return c
        cc = self._encode_concat(batch, bs)
        return {"c_concat": [cc], "c_crossattn": [c]}

    def _encode_concat(self, inputs: Mapping[str, Any], bs: int | None = None) -> torch.Tensor:
        """c_concat [B, 1 + C_z, h, w]: mask resized to the latent grid, masked image encoded."""
        engine = self.engine
        parts = []
        encoded = None
        for key in self.concat_keys:
            cc = engine.image_input(inputs, key)
            if bs is not None:
                cc = cc[:bs]
            cc = cc.to(engine.device)
            if key == self.masked_image_key:
                encoded = engine.get_first_stage_encoding(engine.encode_first_stage(cc))
            parts.append(cc)
        size = encoded.shape[-2:]
        parts = [
            encoded
            if key == self.masked_image_key
            else torch.nn.functional.interpolate(p, size=size)
            for key, p in zip(self.concat_keys, parts, strict=True)
        ]
        return torch.cat(parts, dim=1)

    def _assemble(self, outputs: list[Any]) -> Any:
        if not self.concat_keys:
            return outputs[0]
        return {"c_concat": [outputs[1]], "c_crossattn": [outputs[0]]}

    def inpaint_inputs(self, image: torch.Tensor, mask: torch.Tensor, n: int) -> dict[str, Any]:
        """Batch entries of the concat embedder for ``n`` samples: the mask (1 = repaint) and the
        image with the masked region blanked, both [B, H, W, C] as a data set yields them."""
        masked = image * (mask < 0.5)  # keep where mask == 0
        out = {}
        for key in self.concat_keys:
            value = masked if key == self.masked_image_key else mask
            out[key] = value.permute(0, 2, 3, 1).expand(n, -1, -1, -1)  # [n, H, W, C]
        return out

    # -- training
    def diffuse(self, engine: nn.Module, c: Any, t: torch.Tensor) -> Any:
        """CompVis shortened conditioning schedule: q(c_t | c) at cond_ids[t]."""
        if self.num_timesteps_cond > 1 and isinstance(c, torch.Tensor):
            tc = engine.cond_ids[t].to(engine.device)
            return engine.q_sample(c, tc, torch.randn_like(c.float()))
        return c

    def trainable_parameters(self) -> list[nn.Parameter]:
        model = self.engine.cond_stage_model
        return list(model.parameters()) if self.trains and model is not None else []


def read_entry(engine: nn.Module, batch: Mapping[str, Any], key: str, kind: str) -> Any:
    """A batch entry as an embedder of input ``kind`` takes it: captions as a list, images as
    B x C x H x W, class labels as long and other tensors as float, on the engine's device."""
    if kind == "text":
        return list(batch[key])
    if kind == "image":
        return engine.image_input(batch, key).to(engine.device)
    value = torch.as_tensor(batch[key]).to(engine.device)
    return value.long() if kind == "class" else value.float()


def _takes_batch(module: nn.Module | None) -> bool:
    """CompVis ClassEmbedder-style modules whose forward takes the whole batch dict."""
    return module is not None and "batch" in inspect.signature(module.forward).parameters


def _call_module(module: nn.Module, c: Any, forward: str | None, device: torch.device) -> Any:
    """A conditioning module's output: its ``forward`` method, else ``.encode`` (mode of a
    posterior), else the call (the CompVis ``get_learned_conditioning`` rule)."""
    if forward is not None:
        return getattr(module, forward)(c)
    if isinstance(c, torch.Tensor):
        c = c.to(device)
        if _takes_batch(module):
            c = {getattr(module, "key", "class"): c}  # CompVis ClassEmbedder takes the batch
    encode = getattr(module, "encode", None)
    if callable(encode):
        c = encode(c)
        if not isinstance(c, torch.Tensor) and callable(getattr(c, "mode", None)):
            c = c.mode()
        return c
    return module(c)


def input_kind(spec: Mapping[str, Any]) -> str:
    """How an embedder reads its batch entry: text (default) | class | image | tensor."""
    kind = spec.get("input", "text")
    if kind not in INPUT_KINDS:
        raise ConfigError(
            f"embedder '{spec.get('input_key')}': input must be one of {list(INPUT_KINDS)}, "
            f"got {kind!r}"
        )
    return kind


def default_null(kind: str, module: nn.Module | None) -> Any:
    """'No condition' of an input kind: "" for text, the module's null class (its last class,
    CompVis SD 2.x) for class labels, none (kept in uncond) for images and tensors."""
    if kind == "text":
        return ""
    if kind == "class":
        n_classes = getattr(module, "n_classes", None)
        return int(n_classes) - 1 if n_classes is not None else 0
    return None


class MultiConditioner(nn.Module, Conditioner):
    """Several module embedders, held as ``engine.conditioner.embedders.N`` (the key layout of
    SDXL files, sgm ``GeneralConditioner``), their outputs assembled by kind."""

    concat_keys: tuple[str, ...] = ()
    num_timesteps_cond = 1

    def __init__(
        self, engine: nn.Module, specs: list[dict[str, Any]], modules: list[nn.Module]
    ) -> None:
        nn.Module.__init__(self)
        self.embedders = nn.ModuleList(modules)
        object.__setattr__(self, "engine", engine)  # a back reference, not a submodule
        self.specs = specs
        self.inputs = [input_kind(sp) for sp in specs]
        entries = []
        for i, sp in enumerate(specs):
            key = str(sp["input_key"])
            null = sp["null"] if "null" in sp else default_null(self.inputs[i], modules[i])
            entries.append(
                Embedder(
                    key,
                    functools.partial(self._encode_one, i),  # deep-copies with the module
                    kind=sp.get("kind", "crossattn"),
                    ucg_rate=float(sp.get("ucg_rate", 0.0) or 0.0),
                    null=null,
                    is_trainable=bool(sp.get("is_trainable", False)),
                    zero_null=bool(sp.get("zero_null", False)),
                )
            )
        Conditioner.__init__(self, entries, self._assemble)
        self.trains = any(e.is_trainable for e in entries)
        self.input_key = entries[0].keys[0]  # the CompVis helpers (get_learned_conditioning)
        self.input_kind = self.inputs[0]

    def train(self, mode: bool = True) -> MultiConditioner:
        """Frozen embedders stay in eval mode (sgm ``disabled_train``)."""
        super().train(mode)
        for e, m in zip(self.entries, self.embedders, strict=True):
            if not e.is_trainable:
                m.train(False)
        return self

    def _encode_one(self, i: int, raw: Any) -> Any:
        return _call_module(
            self.embedders[i], raw, self.specs[i].get("forward"), self.engine.device
        )

    def _read(self, i: int, batch: Mapping[str, Any], bs: int | None) -> Any:
        value = read_entry(self.engine, batch, self.entries[i].keys[0], self.inputs[i])
        return value[:bs] if bs is not None else value

    def raw_input(self, batch: Mapping[str, Any], x: torch.Tensor | None, bs: int | None) -> Any:
        return self._read(0, batch, bs)

    def batch_condition(
        self, batch: Mapping[str, Any], x: torch.Tensor | None, bs: int | None, encode: bool = True
    ) -> Any:
        """The assembled conditioning, or (``encode=False``) the raw inputs for ``encode_raw``;
        rows that caption dropout zeroes (``ZERO_KEY`` entries of the batch) go along."""
        inputs = {e.keys[0]: self._read(i, batch, bs) for i, e in enumerate(self.entries)}
        for key, rows in batch.items():
            if isinstance(key, str) and key.startswith(ZERO_KEY):
                inputs[key] = rows[:bs] if bs is not None else rows
        return self.encode(inputs) if encode else inputs

    def encode_raw(self, c: Any) -> Any:
        """Raw inputs of every embedder (a dict) -> the conditioning; else the first embedder's."""
        if isinstance(c, Mapping) and set(self.input_keys) <= set(c):
            return self.encode(c)
        return self._encode_one(0, c)

    def _assemble(self, outputs: list[Any]) -> Any:
        by_kind: dict[str, list[torch.Tensor]] = {"crossattn": [], "vector": [], "concat": []}
        for e, out in zip(self.entries, outputs, strict=True):
            parts = list(out) if isinstance(out, tuple | list) else [out]
            for part in parts:
                kind = e.kind if e.kind != "auto" else NDIM_KINDS.get(part.ndim)
                if kind is None:
                    raise ValueError(
                        f"embedder '{e.keys[0]}' (kind auto) gave an output of {part.ndim} "
                        f"dimensions {tuple(part.shape)}; expected 2 (vector), 3 (crossattn) or "
                        "4/5 (concat)."
                    )
                by_kind[kind].append(part.flatten(1) if kind == "vector" else part)  # [B, D]
        cond: dict[str, Any] = {}
        if by_kind["crossattn"]:
            cond["c_crossattn"] = [torch.cat(by_kind["crossattn"], dim=-1)]  # [B, M, sum D]
        if by_kind["vector"]:
            y = torch.cat(by_kind["vector"], dim=1)
            if self.engine.model.conditioning_key == "adm":
                cond["c_crossattn"] = [y]  # the CompVis route passes y as c_crossattn[0]
            else:
                cond["c_adm"] = y
        if by_kind["concat"]:
            cond["c_concat"] = [torch.cat(by_kind["concat"], dim=1)]
        return cond

    def diffuse(self, engine: nn.Module, c: Any, t: torch.Tensor) -> Any:
        return c

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for e, m in zip(self.entries, self.embedders, strict=True)
            if e.is_trainable
            for p in m.parameters()
        ]


def build_conditioner(engine: nn.Module, config: Mapping[str, Any]) -> EngineConditioner | None:
    """Build the embedder module(s) onto ``engine`` and the Conditioner around them."""

    embedders = list(config.get("embedders") or [])
    unknown = sorted(set(config) - {"embedders", "concat", "num_timesteps_cond"})
    if unknown:
        raise ConfigError(
            f"conditioner_config: unknown key(s) {unknown}; expected embedders, concat, "
            "num_timesteps_cond."
        )
    if not embedders:
        return None
    specs = [dict(e) for e in embedders]
    for i, spec in enumerate(specs):
        bad = sorted(set(spec) - set(EMBEDDER_KEYS))
        if bad:
            raise ConfigError(
                f"conditioner_config.embedders[{i}]: unknown key(s) {bad}; expected some of "
                f"{list(EMBEDDER_KEYS)}."
            )
    if len(specs) > 1:
        return _build_multi(engine, specs, config)
    spec = specs[0]
    if spec.get("zero_null"):
        raise ConfigError(
            "conditioner_config.embedders[0]: zero_null (SDXL's zero-embedding dropout) goes with "
            'several embedders; a single one drops to its null input (null: "" for text).'
        )
    module = spec.get("module")
    trains = bool(spec.get("is_trainable", False))
    if module in (FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL) or spec.get("target") in (
        FIRST_STAGE_SENTINEL,
        UNCONDITIONAL_SENTINEL,
    ):
        sentinel = module or spec.get("target")
        if trains:
            raise ConfigError(
                f"a trainable embedder needs a real {{target, params}}, found '{sentinel}'."
            )
        if sentinel == UNCONDITIONAL_SENTINEL:
            return None
        logger.info("Using the first stage also as the cond stage.")
        engine.cond_stage_model = engine.first_stage_model
    else:
        cfg = spec.get("config") or {"target": spec["target"], "params": spec.get("params") or {}}
        model = instantiate_from_config(cfg)
        engine.cond_stage_model = model if trains else freeze(model)
    if spec.get("ucg_rate") == "from_module":
        # CompVis: a frozen cond stage's own ucg_rate (a trainable one drops in its own forward)
        spec["ucg_rate"] = float(getattr(engine.cond_stage_model, "ucg_rate", 0.0) or 0.0)
    return EngineConditioner(
        engine, spec, config.get("concat"), int(config.get("num_timesteps_cond", 1) or 1)
    )


def _build_multi(
    engine: nn.Module, specs: list[dict[str, Any]], config: Mapping[str, Any]
) -> MultiConditioner:
    """Several module embedders, held by the MultiConditioner module (``engine.conditioner``)."""
    if config.get("concat") or int(config.get("num_timesteps_cond", 1) or 1) > 1:
        raise ConfigError(
            "conditioner_config: `concat` and `num_timesteps_cond` go with a single embedder; "
            "give a concat input as an embedder of kind concat."
        )
    modules = []
    for i, spec in enumerate(specs):
        if "input_key" not in spec:
            raise ConfigError(f"conditioner_config.embedders[{i}] needs input_key.")
        if spec.get("module") is not None or spec.get("target") in (
            FIRST_STAGE_SENTINEL,
            UNCONDITIONAL_SENTINEL,
        ):
            raise ConfigError(
                f"conditioner_config.embedders[{i}]: sentinels go with a single embedder."
            )
        cfg = spec.get("config") or {"target": spec["target"], "params": spec.get("params") or {}}
        module = instantiate_from_config(cfg)
        modules.append(module if spec.get("is_trainable", False) else freeze(module))
    return MultiConditioner(engine, specs, modules)
