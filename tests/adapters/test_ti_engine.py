"""Textual inversion through the engine's ``adapter`` section: what trains, checkpoint, export."""

from __future__ import annotations

import copy

import torch

from ldm.adapters.embeddings_loader import load_embeddings
from ldm.util import instantiate_from_config
from tests.adapters.test_lora_training import _base_file, _batch


def _ti_model(cfg, path):
    cfg = copy.deepcopy(cfg)
    cfg["model"]["params"]["ckpt_path"] = str(path)
    cfg["model"]["params"]["adapter"] = {
        "type": "textual_inversion",
        "tokens": {"purple-ti": {"init": "blue", "vectors": 2}},
    }
    model = instantiate_from_config(cfg["model"])
    model.cond_stage_model.mark_weights_loaded()
    return model


def test_textual_inversion_trains_only_the_new_rows_and_exports_a_loadable_file(tmp_path) -> None:
    cfg, base, path = _base_file(tmp_path)
    model = _ti_model(cfg, path)
    model.train()
    table = model.cond_stage_model.transformer.get_input_embeddings().weight
    assert table.shape[0] == 49408 + 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in model.named_parameters() if p is table]
    assert model.conditioner.trains  # prompts are encoded with gradients
    before = table.detach().clone()
    frozen = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "token_embedding" not in k and k != "model_ema.num_updates"
    }
    opt = model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple | list) else opt
    for _ in range(3):
        batch = _batch()
        batch["txt"] = ["a purple-ti circle", "a large purple-ti square"]
        model.training_step(batch, 0).backward()
        opt.step()
        opt.zero_grad()
        model.on_train_batch_end(None, None, 0)
    after = table.detach()
    assert torch.equal(after[:49408], before[:49408])  # every old token bit-equal
    assert not torch.equal(after[49408:], before[49408:])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    # the adapter-only checkpoint keeps the table (and the EMA bookkeeping), nothing else
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    kept = [k for k in checkpoint["state_dict"] if not k.startswith("model_ema.")]
    assert kept == [
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    ] or (len(kept) == 1 and kept[0].endswith("token_embedding.weight"))
    # export, then load the file into the plain base: the prompt encodes as in the trained model
    files = model.adapter.export(tmp_path / "adapters")
    assert files[0].name == "purple-ti.pt"
    model.eval()
    with torch.no_grad():
        want = model.get_learned_conditioning(["a purple-ti circle"])
        with load_embeddings(base, files):
            got = base.get_learned_conditioning(["a purple-ti circle"])
        plain = base.get_learned_conditioning(["a blue circle"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert base.cond_stage_model.transformer.get_input_embeddings().weight.shape[0] == 49408
    assert not torch.allclose(plain, want)
