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


def test_zero_init_residual_starts_as_embeddings_then_learns_to_mix():
    """zero_init_residual: same keys and shapes; at init each block is the identity, so the output
    is LayerNorm(token + position embedding) (a 0-layer encoder with the same weights); after
    training steps the blocks mix positions (the causal property holds throughout)."""
    torch.manual_seed(0)
    enc = CLIPTextEncoder(**SMALL, max_length=16, zero_init_residual=True)
    plain = CLIPTextEncoder(**SMALL, max_length=16)
    assert {k: v.shape for k, v in enc.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    bag = CLIPTextEncoder(**{**SMALL, "layers": 0}, max_length=16)
    missing = bag.load_state_dict(
        {k: v for k, v in enc.state_dict().items() if ".layers." not in k}, strict=True
    )
    assert not missing.missing_keys
    prompts = ["a small red circle in the left", "a large blue square in the top"]
    with torch.no_grad():
        torch.testing.assert_close(enc(prompts), bag(prompts))
        a0, b0 = enc(["a red circle"]), enc(["a blue circle"])
    torch.testing.assert_close(a0[:, 3], b0[:, 3])  # "circle" does not see the colour yet

    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    target = torch.randn(2, 16, 32)
    for _ in range(20):
        loss = (enc(["a red circle", "a blue circle"]) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a1, b1 = enc(["a red circle"]), enc(["a blue circle"])
    assert (a1[:, 3] - b1[:, 3]).abs().max() > 1e-3  # now it does
    torch.testing.assert_close(a1[:, :2], b1[:, :2])  # still causal: <sot> a
