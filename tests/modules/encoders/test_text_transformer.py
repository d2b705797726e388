"""CLIPTextEncoder: trainable CLIP-style text encoder: causality, caption dropout, learning."""

from __future__ import annotations

import torch

from ldm.modules.encoders.text_transformer import CLIPTextEncoder

SMALL = {"width": 32, "layers": 2, "heads": 4}


def test_shape_and_causality():
    enc = CLIPTextEncoder(**SMALL).eval()
    with torch.no_grad():
        a = enc(["a red cube on a table"])
        b = enc(["a red cube under the sofa"])
    assert a.shape == (1, 77, 32)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # shared prefix: <sot> a red cube
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-4  # "on" vs "under"
    assert all(p.requires_grad for p in enc.parameters())


def test_caption_dropout_to_empty_prompt():
    enc = CLIPTextEncoder(**SMALL, ucg_rate=0.5)
    prompts = [f"prompt {i}" for i in range(4000)]
    dropped = enc.train().drop_captions(prompts, generator=torch.Generator().manual_seed(0))
    frac = sum(d == "" for d in dropped) / len(prompts)
    assert abs(frac - 0.5) < 0.03
    assert all(d in ("", p) for d, p in zip(dropped, prompts))
    assert enc.eval().drop_captions(prompts) == prompts
    always = CLIPTextEncoder(**SMALL, ucg_rate=1.0).train()
    null = always.get_unconditional_conditioning(2)
    with torch.no_grad():
        torch.testing.assert_close(always(["a cat", "a dog"]), always.eval()(null))


def test_learns_to_separate_prompts():
    """A few Adam steps fit prompt-specific targets: the loss falls by a large factor."""
    torch.manual_seed(0)
    enc = CLIPTextEncoder(**SMALL, max_length=16).train()
    prompts = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
    targets = torch.randn(4, 32)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        z = enc(prompts)[:, 4]  # state after the last content token
        loss = (z - targets).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
