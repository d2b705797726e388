"""The engine's Conditioner, built from ``conditioner_config``:

    embedders:            # one module embedder (its weights are the checkpoint's `cond_stage_model.*`)
      - target: ldm.modules.encoders.clip.FrozenCLIPEmbedder   # or module: __is_first_stage__
        params: {...}
        input_key: caption    # the batch key it reads
        ucg_rate: 0.1         # caption dropout in training (classifier-free guidance)
        null: ""              # the raw "no condition" (default: "" for text, the null class)
        # config: {target, params}   (instead of target / params)
        is_trainable: false   # frozen (eval mode, no grad) unless true
        kind: crossattn       # crossattn | vector | concat
        forward: encode       # the module's method to call (CompVis cond_stage_forward)
    concat:               # inpainting: [mask, E(masked image)] concatenated to the input
      keys: [mask, masked_image]
      masked_image_key: masked_image
    num_timesteps_cond: 1 # CompVis: diffuse the condition with t (shortened schedule) when > 1

Raw inputs are read from a batch as CompVis data sets give them: captions as strings, class labels
as ints, images as B x H x W x C in [-1, 1].
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.engine.conditioner import Conditioner, Embedder
from ldm.engine.frozen import freeze
from ldm.engine.network import CLASS_KEYS, TEXT_KEYS
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
)


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
        """'No condition': the empty prompt, the null class (CompVis SD 2.x), else none."""
        if self.input_key in TEXT_KEYS:
            return ""
        if self.input_key in CLASS_KEYS:
            n_classes = getattr(self.engine.cond_stage_model, "n_classes", None)
            return int(n_classes) - 1 if n_classes is not None else 0
        return None

    def encode_raw(self, c: Any) -> Any:
        """tau_theta(y): the ``forward`` method, else ``.encode`` (mode of a posterior), else call."""
        model = self.engine.cond_stage_model
        if self.forward_name is not None:
            return getattr(model, self.forward_name)(c)
        if isinstance(c, torch.Tensor):
            c = c.to(self.engine.device)
            if "batch" in inspect.signature(model.forward).parameters:
                c = {getattr(model, "key", "class"): c}  # CompVis ClassEmbedder takes the batch
        encode = getattr(model, "encode", None)
        if callable(encode):
            c = encode(c)
            if not isinstance(c, torch.Tensor) and callable(getattr(c, "mode", None)):
                c = c.mode()
            return c
        return model(c)

    def raw_input(self, batch: Mapping[str, Any], x: torch.Tensor | None, bs: int | None) -> Any:
        """The raw condition of a batch: captions (list), class labels, or an image tensor."""
        key, engine = self.input_key, self.engine
        if key == engine.first_stage_key and x is not None:
            xc = x
        elif key in TEXT_KEYS:
            xc = list(batch[key])
        elif key in CLASS_KEYS:
            model = engine.cond_stage_model
            if model is not None and "batch" in inspect.signature(model.forward).parameters:
                xc = batch  # CompVis ClassEmbedder.forward takes the batch dict
            else:
                xc = torch.as_tensor(batch[key]).to(engine.device)
        else:
            xc = engine.image_input(batch, key).to(engine.device)
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
    if len(embedders) > 1:
        raise ConfigError(
            f"conditioner_config.embedders: {len(embedders)} embedders; this engine takes one "
            "module embedder (plus `concat` for inpainting)."
        )
    spec = dict(embedders[0])
    bad = sorted(set(spec) - set(EMBEDDER_KEYS))
    if bad:
        raise ConfigError(
            f"conditioner_config.embedders[0]: unknown key(s) {bad}; expected some of "
            f"{list(EMBEDDER_KEYS)}."
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
