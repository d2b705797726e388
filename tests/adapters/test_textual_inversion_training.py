"""TextualInversion: only the new rows learn (AdamW with weight decay), everything else frozen;
saving, resuming and removal."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_sdxl import build_tiny_sdxl
from tiny_text_encoders import Holder, table, txt2img_encoder

from ldm.adapters.embeddings_encoders import token_embedding
from ldm.adapters.embeddings_file import read_embeddings
from ldm.adapters.embeddings_loader import load_embeddings
from ldm.adapters.textual_inversion import TextualInversion
from ldm.modules.encoders.tokenizer import VOCAB_SIZE, get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of <obj> on a <sty> table"


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl()


def _outputs(engine) -> list[torch.Tensor]:
    """Every tensor the engine's text encoders give for PROMPT (contexts and the pooled vector)."""
    outs = []
    for i in (0, 1):
        out = engine.conditioner.embedders[i]([PROMPT])
        outs += list(out) if isinstance(out, tuple) else [out]
    return outs


def _train(ti: TextualInversion, loss_fn, steps: int = 3) -> None:
    opt = torch.optim.AdamW(ti.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        ti.after_step()


def test_adamw_moves_only_the_new_rows(sdxl):
    encoders = [sdxl.conditioner.embedders[0], sdxl.conditioner.embedders[1]]
    state = copy.deepcopy(sdxl.state_dict())
    flags = {n: p.requires_grad for n, p in sdxl.named_parameters()}
    before = [table(e) for e in encoders]
    ti = TextualInversion(sdxl, {"<obj>": {"vectors": 2, "init": "dog"}, "<sty>": {}})
    dog = [get_tokenizer(m, 77).encode("dog") for m in ("sd-v1", "sd-v2")]
    for e, t, ids in zip(encoders, before, dog, strict=True):  # init: mean of "dog"'s rows
        start = t[ids].mean(0)
        assert torch.equal(table(e)[VOCAB_SIZE : VOCAB_SIZE + 2], start.expand(2, -1))
    targets = [torch.randn_like(o) for o in _outputs(sdxl)]
    start_rows = [table(e)[VOCAB_SIZE:] for e in encoders]
    _train(ti, lambda: sum(((o - t) ** 2).mean() for o, t in zip(_outputs(sdxl), targets)))

    tables = ti.parameters()
    assert [p is token_embedding(e).weight for p, e in zip(tables, encoders)] == [True, True]
    for e, t, rows in zip(encoders, before, start_rows, strict=True):
        now = table(e)
        assert torch.equal(now[:VOCAB_SIZE], t)  # every other row bit-equal despite weight decay
        assert (now[VOCAB_SIZE:] - rows).abs().amax(dim=1).gt(0).all()  # every new row moved
    for name, p in sdxl.named_parameters():
        if any(p is t for t in tables):
            continue
        assert not p.requires_grad and p.grad is None, name
    learned = ti.learned()
    assert {t: {k: v.shape for k, v in d.items()} for t, d in learned.items()} == {
        "<obj>": {"clip_l": (2, 32), "clip_g": (2, 48)},
        "<sty>": {"clip_l": (1, 32), "clip_g": (1, 48)},
    }
    ti.remove()
    after = sdxl.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in sdxl.named_parameters()} == flags


def test_save_load_and_resume(sdxl, tmp_path):
    ti = TextualInversion(
        sdxl, {"<obj>": {"vectors": 2}}, generator=torch.Generator().manual_seed(1)
    )
    target = torch.randn_like(_outputs(sdxl)[1])
    _train(ti, lambda: ((_outputs(sdxl)[1] - target) ** 2).mean(), steps=2)
    learned, state = ti.learned(), ti.state_dict()
    files = ti.save(tmp_path / "<obj>.safetensors", step=2)
    diffusers = ti.save(tmp_path / "learned_embeds.safetensors", format="diffusers")
    with torch.no_grad():
        trained_out = _outputs(sdxl)
    ti.remove()

    (item,) = read_embeddings(files[0])
    assert item.token == "<obj>" and all(torch.equal(item.vectors[k], learned["<obj>"][k])
                                         for k in ("clip_l", "clip_g"))  # fmt: skip
    (item,) = read_embeddings(diffusers[0])
    assert item.format == "diffusers-sdxl"
    assert torch.equal(item.vectors["clip_g"], learned["<obj>"]["clip_g"])
    with load_embeddings(sdxl, files[0]), torch.no_grad():  # sampling sees what training saw
        assert all(torch.equal(a, b) for a, b in zip(_outputs(sdxl), trained_out, strict=True))

    resumed = TextualInversion(sdxl, {"<obj>": {"vectors": 2}})
    resumed.load_state_dict(state)
    assert all(
        torch.equal(resumed.learned()["<obj>"][k], learned["<obj>"][k]) for k in learned["<obj>"]
    )
    with pytest.raises(ValueError, match="tokens.*<other>.*same tokens"):
        resumed.load_state_dict({"vectors": {"<other>": {}}})
    resumed.remove()


def test_trainable_encoder_is_frozen_except_the_table():
    """The txt2img encoder trains with the U-Net normally; here only the new row may change."""
    encoder = txt2img_encoder()
    engine = Holder(encoder)
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    ti = TextualInversion(engine, ["<sty>"], generator=torch.Generator().manual_seed(0))
    assert table(encoder)[VOCAB_SIZE].std() > 0  # N(0, table std) start
    _train(ti, lambda: encoder(["a <sty> red circle"]).square().mean())
    for name, p in encoder.named_parameters():
        if p is ti.parameters()[0]:
            assert torch.equal(p[:VOCAB_SIZE], before[name]) and p.shape[0] == VOCAB_SIZE + 1
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[name])
    with pytest.raises(ValueError, match="unknown key.*'vector'"):
        TextualInversion(engine, {"<x>": {"vector": 2}})
    ti.remove()
    assert all(p.requires_grad for p in encoder.parameters())
