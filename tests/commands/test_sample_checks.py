"""What the sampling commands refuse before sampling: a model they cannot condition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldm.commands.sample_checks import CommandError, check_mode
from ldm.modules.encoders.class_embedder import ClassEmbedder


def _model(keys: list[str], text: str | None) -> SimpleNamespace:
    conditioner = SimpleNamespace(input_keys=keys, text_key=lambda: text)
    return SimpleNamespace(conditioner=conditioner)


def test_a_class_conditional_model_is_pointed_to_the_python_api() -> None:
    with pytest.raises(CommandError, match=r"conditioned on \['class_label'\], not on text.*"
                       r"generate\(batch=\{'class_label': \[\.\.\.\]\}\)"):  # fmt: skip
        check_mode("txt2img", _model(["class_label"], None), "--ckpt", "cin.ckpt")
    check_mode("txt2img", _model(["txt"], "txt"), "--ckpt", "sd.ckpt")  # text: fine
    check_mode("txt2img", _model([], None), "--ckpt", "uncond.ckpt")  # unconditional: fine
    check_mode("inpaint", _model(["mask", "masked_image"], None), "--ckpt", "ldm-inpaint.ckpt")


def test_class_labels_as_a_list_embed_like_a_tensor() -> None:
    torch.manual_seed(0)
    embedder = ClassEmbedder(embed_dim=4, n_classes=3).eval()
    with torch.no_grad():
        from_list = embedder([1, 2])
        from_tensor = embedder(torch.tensor([1, 2]))
        from_batch = embedder({"class": [1, 2]})
    assert torch.equal(from_list, from_tensor) and torch.equal(from_batch, from_tensor)
