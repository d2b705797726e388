"""optimizer_config: the optimizer types, param groups by name, freeze, and the errors."""

from __future__ import annotations

import importlib
import logging
import re

import pytest
import torch
from tiny_engines import tiny_engine, train_steps
from torch import nn

from ldm import optimizers
from ldm.optim import adamw
from ldm.optimizers import OPTIMIZER_TYPES, OptimizerSpec, build_optimizer, optimizer_class
from ldm.param_groups import param_names
from ldm.util import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR_WARMUP = {
    "target": "ldm.lr_scheduler.LambdaLinearScheduler",
    "params": {
        "warm_up_steps": [10],
        "cycle_lengths": [100],
        "f_start": [0.1],
        "f_max": [1.0],
        "f_min": [1.0],
    },
}
FIRST_CONV = r"^model\.diffusion_model\.input_blocks\.0\."
EMBEDDINGS = r"^cond_stage_model\.transformer\.(text_model\.)?embeddings\."


def spec(config: dict) -> OptimizerSpec:
    out = OptimizerSpec.from_config(config)
    assert out is not None
    return out


# ---------------------------------------------------------------- the default
def test_default_is_ldm_optim_adamw() -> None:
    engine = tiny_engine()
    engine.learning_rate = 3e-4
    opt = engine.configure_optimizers()
    reference = adamw(engine.trainable_parameters(), lr=3e-4)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults == reference.defaults and opt.defaults["fused"] is True
    assert len(opt.param_groups) == 1 and "name" not in opt.param_groups[0]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [
        id(p) for p in engine.model.parameters()
    ]
    assert engine.optimizer_spec is None


def test_type_adamw_with_no_options_is_the_default() -> None:
    engine = tiny_engine(optimizer_config={"type": "adamw"})
    opt = engine.configure_optimizers()
    reference = adamw(engine.trainable_parameters(), lr=engine.learning_rate)
    assert type(opt) is torch.optim.AdamW and opt.defaults == reference.defaults
    assert len(opt.param_groups) == 1


def test_options_reach_the_optimizer() -> None:
    engine = tiny_engine(
        optimizer_config={"type": "adamw", "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}
    )
    d = engine.configure_optimizers().defaults
    assert (d["betas"], d["eps"], d["weight_decay"], d["fused"]) == ((0.8, 0.95), 1e-6, 0.1, True)


def test_target_form_as_sgm_writes_it() -> None:
    engine = tiny_engine(
        optimizer_config={"target": "torch.optim.SGD", "params": {"momentum": 0.9}}
    )
    engine.learning_rate = 0.05
    opt = engine.configure_optimizers()
    assert type(opt) is torch.optim.SGD
    assert (opt.defaults["lr"], opt.defaults["momentum"]) == (0.05, 0.9)


# ---------------------------------------------------------------- param groups and freeze
def test_param_groups_get_their_learning_rates() -> None:
    engine = tiny_engine(
        loss_config={"learn_logvar": True},
        optimizer_config={
            "weight_decay": 0.01,
            "param_groups": [
                {"pattern": r"^model\.diffusion_model\.out\.", "lr": 1e-6, "name": "head"},
                {"pattern": r"^logvar$", "lr_scale": 0.1, "weight_decay": 0.0},
            ],
        },
    )
    engine.learning_rate = 2e-4
    opt = engine.configure_optimizers()
    base, head, logvar = opt.param_groups
    assert (base["name"], base["lr"], base["weight_decay"]) == ("base", 2e-4, 0.01)
    assert (head["name"], head["lr"], head["weight_decay"]) == ("head", 1e-6, 0.01)
    assert logvar["name"] == "group1" and logvar["weight_decay"] == 0.0
    assert logvar["lr"] == pytest.approx(2e-5)
    names = param_names(engine)
    assert all(names[id(p)][0].startswith("model.diffusion_model.out.") for p in head["params"])
    assert logvar["params"] == [engine.logvar]
    n_model = len(list(engine.model.parameters()))
    assert len(base["params"]) + len(head["params"]) == n_model
    assert opt.defaults["fused"] is True


def test_first_match_wins_and_a_shadowed_group_is_an_error() -> None:
    groups = [
        {"pattern": r"^model\.", "lr": 1e-5},
        {"pattern": r"^model\.diffusion_model\.out\.", "lr": 1e-6},
    ]
    engine = tiny_engine(optimizer_config={"param_groups": groups})
    with pytest.raises(ConfigError, match=r"param_groups\[1\].*taken by the earlier.*\[0\]"):
        engine.configure_optimizers()
    engine = tiny_engine(optimizer_config={"param_groups": groups[:1]})
    (only,) = engine.configure_optimizers().param_groups  # everything matched: no base group
    assert only["lr"] == 1e-5


def test_lambda_lr_scales_every_group() -> None:
    engine = tiny_engine(
        scheduler_config=LINEAR_WARMUP,
        optimizer_config={"param_groups": [{"pattern": r"\.out\.", "lr_scale": 0.5}]},
    )
    engine.learning_rate = 1e-3
    [opt], [sched] = engine.configure_optimizers()
    lam = sched["scheduler"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 5e-5])  # f_start 0.1
    for _ in range(5):
        opt.step()
        lam.step()
    factor = 0.1 + (1.0 - 0.1) * 5 / 10
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * factor, 5e-4 * factor])


def test_frozen_parameters_get_no_gradient_and_are_in_neither_optimizer_nor_ema() -> None:
    engine = tiny_engine(use_ema=True, optimizer_config={"freeze": [FIRST_CONV]})
    frozen = {
        n: p
        for n, p in engine.named_parameters()
        if n.startswith("model.diffusion_model.input_blocks.0.")
    }
    assert len(frozen) == 2 and not any(p.requires_grad for p in frozen.values())
    before = {n: p.detach().clone() for n, p in frozen.items()}
    in_opt = {id(p) for p in engine.trainable_parameters()}
    assert not in_opt & {id(p) for p in frozen.values()}
    assert len(in_opt) == len(list(engine.model.parameters())) - 2
    ema_keys = set(engine.model_ema.state_dict())
    assert "diffusion_modelinput_blocks00weight" not in ema_keys
    assert "diffusion_modelinput_blocks10in_layers0weight" in ema_keys
    train_steps(engine, 2)
    for n, p in frozen.items():
        assert p.grad is None and torch.equal(p, before[n])
    opt = engine.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == in_opt
    # the EMA follows the others and its scope leaves the frozen weights alone
    with engine.ema_scope():
        assert torch.equal(
            frozen["model.diffusion_model.input_blocks.0.0.weight"],
            before["model.diffusion_model.input_blocks.0.0.weight"],
        )


def test_freeze_through_the_compvis_translator() -> None:
    from tiny_models import tiny_ldm_config

    from ldm.util import instantiate_from_config

    cfg = tiny_ldm_config()
    params = cfg["model"]["params"]
    params["cond_stage_trainable"] = True
    params["cond_stage_config"]["params"]["freeze"] = False  # FrozenCLIPEmbedder's own switch
    params["optimizer_config"] = {
        "type": "adamw",
        "param_groups": [{"pattern": r"^cond_stage_model\.", "lr": 1e-6}],
        "freeze": [EMBEDDINGS],  # transformers >= 5 names them without text_model
    }
    model = instantiate_from_config(cfg["model"])
    model.learning_rate = 1e-4
    base, text = model.configure_optimizers().param_groups
    assert (base["lr"], text["lr"]) == (1e-4, 1e-6)
    emb = [p for n, p in model.named_parameters() if re.search(EMBEDDINGS, n)]
    assert len(emb) == 2 and not any(p.requires_grad for p in emb)
    assert not {id(p) for p in emb} & {id(p) for p in text["params"]}
    assert len(text["params"]) == len(list(model.cond_stage_model.parameters())) - 2


# ---------------------------------------------------------------- every type steps
def regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))  # 4096 weights: 8-bit
    x = torch.randn(64, 64)
    return net, x, torch.randn(64, 8)


LRS = {"sgd": 0.1, "prodigy": 1.0, "adafactor": 1e-2}
PACKAGES = {"adamw8bit": "bitsandbytes", "lion8bit": "bitsandbytes", "lion": "lion_pytorch",
            "prodigy": "prodigyopt"}  # fmt: skip


@pytest.mark.parametrize("name", list(OPTIMIZER_TYPES))
def test_each_type_builds_and_reduces_a_loss(name: str) -> None:
    if name in PACKAGES:
        pytest.importorskip(PACKAGES[name])
    net, x, y = regression()
    opt = build_optimizer(
        list(net.parameters()), param_names(net), LRS.get(name, 1e-3), spec({"type": name})
    )
    assert type(opt).__name__ == OPTIMIZER_TYPES[name].attr
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


def test_adamw8bit_keeps_8bit_states() -> None:
    pytest.importorskip("bitsandbytes")
    net, x, y = regression()
    opt = build_optimizer(list(net.parameters()), {}, 1e-3, spec({"type": "adamw8bit"}))
    (net(x) - y).square().mean().backward()
    opt.step()
    state = opt.state[net[0].weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_bitsandbytes_8bit_runs_on_this_cpu() -> None:
    """Found with bitsandbytes 0.50: its 8-bit optimizers step on CPU tensors."""
    bnb = pytest.importorskip("bitsandbytes", minversion="0.50")
    assert optimizers._cpu_8bit_failure(bnb.optim.AdamW8bit) is None


def test_8bit_on_a_cpu_without_kernels_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(optimizers, "_cpu_8bit_failure", lambda cls: "RuntimeError: no CPU kernel")
    net, _, _ = regression()
    with pytest.raises(ConfigError, match=r"'adamw8bit' .*does not run on the CPU.*CUDA"):
        build_optimizer(list(net.parameters()), {}, 1e-3, spec({"type": "adamw8bit"}))


def test_prodigy_warns_about_a_small_learning_rate(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("prodigyopt")
    net, _, _ = regression()
    with caplog.at_level(logging.WARNING, logger="ldm.optimizers"):
        build_optimizer(list(net.parameters()), {}, 1e-4, spec({"type": "prodigy"}))
    assert "base_learning_rate: 1.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.optimizers"):
        build_optimizer(list(net.parameters()), {}, 1.0, spec({"type": "prodigy"}))
    assert caplog.text == ""


def test_adafactor_falls_back_to_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.optim, "Adafactor")
    cls, defaults = optimizer_class("adafactor")
    assert cls.__module__.startswith("transformers")
    assert defaults == {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    net, x, y = regression()
    opt = build_optimizer(list(net.parameters()), {}, 1e-2, spec({"type": "adafactor"}))
    assert opt.defaults["lr"] == 1e-2 and opt.defaults["relative_step"] is False


# ---------------------------------------------------------------- errors
def test_a_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def no_lion(name: str, *args, **kwargs):
        if name == "lion_pytorch":
            raise ModuleNotFoundError("No module named 'lion_pytorch'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_lion)
    with pytest.raises(ConfigError, match=r"'lion-pytorch'.*pip install 'ldm\[optim\]'"):
        OptimizerSpec.from_config({"type": "lion"})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"type": "adamm"},
            r"unknown optimizer 'adamm' \(did you mean 'adamw'\?\); expected one of \['adamw', 'adamw8bit'",
        ),
        (
            {"type": "adamw", "weight_decy": 0.1},
            r"no option 'weight_decy' \(did you mean 'weight_decay'\?\)",
        ),
        (
            {"type": "sgd", "lr": 0.1},
            r"optimizer_config.lr: the learning rate is model.base_learning_rate",
        ),
        ({"type": "adamw", "params": {"eps": 1e-6}}, r"params goes with `target`"),
        ({"target": "torch.optim.SGD", "momentum": 0.9}, r"go under `params`"),
        ({"target": "torch.nn.Linear"}, r"not a torch.optim.Optimizer"),
        ({"type": "adamw", "target": "torch.optim.SGD"}, r"`type` or `target`, not both"),
        ({"param_groups": [{"pattern": "x", "lr": 1, "lr_scale": 2}]}, r"either lr .* or lr_scale"),
        (
            {"param_groups": [{"pattern": "x", "betas": [0.9, 0.9], "momentun": 1}]},
            r"param_groups\[0\]: unknown key 'momentun'",
        ),
        (
            {"param_groups": [{"pattern": "(", "lr": 1}]},
            r"param_groups\[0\].pattern: '\(' is not a valid regular expression",
        ),
        ({"param_groups": [{"lr": 1}]}, r"param_groups\[0\]: expected a mapping with a `pattern`"),
        ("adamw", r"expected a mapping"),
    ],
)
def test_config_errors(config: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OptimizerSpec.from_config(config)


def test_patterns_that_match_nothing() -> None:
    with pytest.raises(
        ConfigError,
        match=r"freeze\[0\] '\^unet\\\.' matches no parameter; the model has model.diffusion_model.\* \(",
    ):
        tiny_engine(optimizer_config={"freeze": [r"^unet\."]})
    engine = tiny_engine(
        optimizer_config={"param_groups": [{"pattern": "^cond_stage_model", "lr": 1}]}
    )
    with pytest.raises(
        ConfigError,
        match=r"param_groups\[0\].pattern '\^cond_stage_model' matches no trained parameter: the trained parameters are model.diffusion_model.\*",
    ):
        engine.configure_optimizers()
    out = r"^model\.diffusion_model\.out\."
    engine = tiny_engine(
        optimizer_config={"freeze": [out], "param_groups": [{"pattern": out, "lr": 1}]}
    )
    with pytest.raises(ConfigError, match=r"the 4 parameters it matches .* do not train"):
        engine.configure_optimizers()


def test_translators_pass_the_options_through() -> None:
    from tiny_models import tiny_ldm_config
    from tiny_sdxl import tiny_sdxl_config

    from ldm.models.diffusion import ddpm, sgm

    options = {
        "optimizer_config": {"type": "lion", "weight_decay": 0.1},
        "ema_device": "cpu",
        "ema_every": 4,
        "gradient_checkpointing": {"unet": True},
        "compile": {"mode": "default"},
    }
    out = ddpm.translate("latent", {**tiny_ldm_config()["model"]["params"], **options})
    assert {k: out[k] for k in options} == options
    sgm_params = tiny_sdxl_config()["model"]["params"]
    sgm_opt = {"target": "torch.optim.AdamW", "params": {"eps": 1e-6}}
    out = sgm.translate({**sgm_params, "optimizer_config": sgm_opt, "compile_model": True})
    assert out["optimizer_config"] == sgm_opt and out["compile"] is True
    assert (out["ema_device"], out["ema_every"]) == (None, 1)
    out = sgm.translate({**sgm_params, **options})
    assert {k: out[k] for k in options} == options
