"""LoRA training through the engine's ``adapter`` section (peft): what trains, EMA, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from ldm.util import ConfigError, instantiate_from_config
from tests.fixtures.tiny_models import build_tiny, tiny_ldm_config

pytest.importorskip("peft")


def _base_file(tmp_path, use_ema: bool = True):
    cfg = tiny_ldm_config()
    cfg["model"]["params"]["use_ema"] = use_ema
    base = build_tiny(cfg, seed=3)
    if use_ema:  # an EMA that differs from the raw weights, as after training
        with torch.no_grad():
            for _name, buf in base.model_ema.named_buffers():
                if buf.ndim:
                    buf.add_(0.01)
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return cfg, base, path


def _lora_model(cfg, path, **adapter):
    cfg = copy.deepcopy(cfg)
    cfg["model"]["params"]["ckpt_path"] = str(path)
    cfg["model"]["params"]["adapter"] = {"type": "lora", "rank": 4, **adapter}
    model = instantiate_from_config(cfg["model"])
    model.cond_stage_model.mark_weights_loaded()
    return model


def _batch(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"jpg": torch.rand(n, 32, 32, 3, generator=g) * 2 - 1, "txt": ["a red circle"] * n}


def test_only_adapter_parameters_train_and_the_start_is_the_base_ema(tmp_path) -> None:
    cfg, base, path = _base_file(tmp_path)
    model = _lora_model(cfg, path, alpha=8, targets=["attention", "projection", "resnet"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    # resnet convs (3x3) and attention linears are wrapped
    assert any("in_layers.2.lora_A" in n for n in trainable)
    assert any("attn2.to_k.lora_B" in n for n in trainable)
    # the EMA follows exactly the adapter's parameters
    assert len(model.model_ema.m_name2s_name) == sum(n.startswith("model.") for n in trainable)
    # B = 0 at the start: the output is the base's with its EMA weights
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond = base.get_learned_conditioning(["a red circle", "a blue square"])
    with torch.no_grad(), base.ema_scope():
        want = base.apply_model(x, t, cond)
    with torch.no_grad():
        got = model.apply_model(x, t, cond)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_training_step_moves_only_the_adapter(tmp_path) -> None:
    cfg, _, path = _base_file(tmp_path, use_ema=False)
    model = _lora_model(cfg, path, dropout=0.1)
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    opt = model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple | list) else opt
    for _ in range(2):
        loss = model.training_step(_batch(), 0)
        loss.backward()
        for p in model.parameters():
            assert p.grad is None or p.requires_grad
        opt.step()
        opt.zero_grad()
        model.on_train_batch_end(None, None, 0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in lora_before.items())


def test_checkpoint_keeps_only_the_adapter_and_resumes_strictly(tmp_path) -> None:
    cfg, _, path = _base_file(tmp_path)
    model = _lora_model(cfg, path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.5)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    assert saved and all(".lora_" in k or k.startswith("model_ema.") for k in saved)
    ema = [k for k in saved if k.startswith("model_ema.")]
    assert len(ema) == 2 + sum(".lora_" in k and k.startswith("model.") for k in saved)
    assert checkpoint["adapter"]["type"] == "lora"
    # a fresh engine from the same config: Lightning's strict load works after fill_base
    fresh = _lora_model(cfg, path)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # without the adapter section the checkpoint is refused with a message
    plain = instantiate_from_config({**cfg["model"], "params": {**cfg["model"]["params"]}})
    with pytest.raises(ValueError, match="holds only the weights of an adapter"):
        plain.on_load_checkpoint({"state_dict": dict(saved), "adapter": {"type": "lora"}})


def test_bad_adapter_sections_are_refused(tmp_path) -> None:
    cfg, _, path = _base_file(tmp_path, use_ema=False)
    with pytest.raises(ConfigError, match="unknown key"):
        _lora_model(cfg, path, rnak=4)
    with pytest.raises(ConfigError, match="match no Linear/Conv2d"):
        _lora_model(cfg, path, targets=[r"nothing\.here"])
    with pytest.raises(ConfigError, match="expected one of"):
        c = copy.deepcopy(cfg)
        c["model"]["params"]["adapter"] = {"type": "loha"}
        instantiate_from_config(c["model"])


def test_text_encoder_lora_trains_through_the_encoder(tmp_path) -> None:
    cfg, _, path = _base_file(tmp_path, use_ema=False)
    model = _lora_model(cfg, path, text_encoder=True)
    model.train()
    te = [n for n, p in model.named_parameters() if p.requires_grad and "cond_stage" in n]
    assert te and all("self_attn" in n or "mlp" in n for n in te)
    assert model.conditioner.trains  # the prompt is encoded with gradients
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    loss = model.training_step(_batch(), 0)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n in te]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_lora_file_merges_into_the_ema_weights_a_model_samples_with(tmp_path) -> None:
    from ldm.adapters.lora_apply import apply_loras
    from ldm.adapters.lora_io import save_lora
    from ldm.adapters.lora_weights import LoraModule

    cfg, base, _ = _base_file(tmp_path)  # use_ema=True, EMA != raw weights
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    out_f, in_f = shapes[key]
    lora = {key: LoraModule(torch.randn(2, in_f, generator=g), torch.randn(out_f, 2, generator=g))}
    path = save_lora(tmp_path / "l.safetensors", lora, shapes, format="kohya")
    kw = {"steps": 2, "seed": 3, "output": "tensor", "guidance_scale": 2.0}
    with torch.no_grad():
        got = base.generate(["a red circle"], loras=[(str(path), 0.5)], **kw)
        with base.ema_scope(), apply_loras(base, [(str(path), 0.5)]):
            want = base.generate(["a red circle"], use_ema=False, **kw)
        plain = base.generate(["a red circle"], **kw)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert base.use_ema  # switched back on


def test_sdxl_lora_training_exports_sgm_names_and_loads_back(tmp_path) -> None:
    """SDXL (sgm layout): U-Net LoRA + CLIP-L text-encoder LoRA -> kohya names lora_unet_<sgm
    path> and lora_te1_; the file loads against the plain model and reproduces the trained deltas."""
    from safetensors.torch import load_file

    from ldm.adapters.lora_io import load_lora
    from tests.fixtures.tiny_sdxl import build_tiny_sdxl, tiny_sdxl_config

    base = build_tiny_sdxl()
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    cfg = tiny_sdxl_config()
    cfg["model"]["params"]["ckpt_path"] = str(path)
    cfg["model"]["params"]["adapter"] = {"type": "lora", "rank": 2, "text_encoder": True}
    model = instantiate_from_config(cfg["model"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    out = model.adapter.export(tmp_path / "adapters")[0]
    keys = list(load_file(str(out)))
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert not any(k.startswith("lora_te2_") for k in keys)
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    loaded = load_lora(out, shapes)
    trained = model.adapter.lora_set()
    assert loaded.modules.keys() == trained.keys()
    for key, m in trained.items():
        torch.testing.assert_close(loaded.modules[key].delta(), m.delta(), rtol=0, atol=1e-6)
