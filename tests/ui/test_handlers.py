"""The web UI's handlers without a browser: settings -> generate call -> PNGs with the commands'
metadata; seeds; restoring settings from a PNG; checkpoints loaded lazily; flag and upload safety."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.commands.pngmeta import read_params, save_png
from ldm.ui.adapter_files import embedding_files, lora_files
from ldm.ui.cli import build_parser, configure, main
from ldm.ui.errors import UiError
from ldm.ui.handlers import UiContext, generate_images, model_defaults
from ldm.ui.masks import editor_inputs, mask_from_layers
from ldm.ui.models import ModelSlot, checkpoint_table
from ldm.ui.restore import settings_from_png
from ldm.ui.safety import decode_upload, parse_auth, server_name
from ldm.ui.settings import RANDOM_SEED, Settings, reuse_seed

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeConditioner:
    def text_key(self) -> str:
        return "caption"


class FakeModel:
    """Records every generate call; answers with a grey image of the asked size."""

    conditioner = FakeConditioner()
    sampling_defaults = {"sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 4.0}

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def latent_shape(self) -> tuple[int, int, int]:
        return 4, 8, 8

    def generate(self, prompt: Any, **kwargs: Any) -> list[Image.Image]:
        self.calls.append((prompt, kwargs))
        for i in range(kwargs["steps"]):
            kwargs["callback"]({"i": i, "total": kwargs["steps"]})
        return [Image.new("RGB", (kwargs["width"] or 8, kwargs["height"] or 8), (90, 90, 90))]


@pytest.fixture
def fake(tmp_path: Path) -> tuple[UiContext, FakeModel]:
    model = FakeModel()
    ckpt = tmp_path / "fake.ckpt"
    ckpt.write_bytes(b"weights")
    slot = ModelSlot({"fake.ckpt": ckpt}, loader=lambda path, device: model)
    return UiContext(models=slot, outdir=tmp_path / "out"), model


@pytest.fixture(scope="module")
def shapes(shapes_ckpt: Path, tmp_path_factory) -> UiContext:
    """The random shapes model behind the handlers, with a LoRA and an embedding to pick."""
    adapters = tmp_path_factory.mktemp("adapters")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    out_dim, in_dim = torch.load(shapes_ckpt, weights_only=True)["state_dict"][key].shape
    gen = torch.Generator().manual_seed(0)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v"
    save_file(
        {
            f"{name}.lora_down.weight": torch.randn(1, in_dim, generator=gen),
            f"{name}.lora_up.weight": torch.randn(out_dim, 1, generator=gen),
            f"{name}.alpha": torch.tensor(1.0),
        },
        str(adapters / "purple.safetensors"),
    )
    torch.save({"string_to_param": {"*": torch.randn(1, 128)}}, adapters / "sparkle.pt")
    slot = ModelSlot(checkpoint_table(str(shapes_ckpt), None), device="cpu")
    return UiContext(
        models=slot,
        outdir=tmp_path_factory.mktemp("out"),
        loras=lora_files(adapters),
        embeddings=embedding_files(adapters),
    )


def test_generate_calls_generate_with_the_settings(fake, tmp_path: Path) -> None:
    ctx, model = fake
    seen: list[tuple[int, int]] = []
    settings = Settings(
        prompt="a red circle", negative_prompt="blurry", sampler="ddim", steps=3,
        guidance_scale=2.5, seed=42, width=16, height=24, batch=2,
    )  # fmt: skip
    result = generate_images(ctx, settings, progress=lambda done, total: seen.append((done, total)))
    assert [prompt for prompt, _ in model.calls] == ["a red circle", "a red circle"]
    for i, (_, kw) in enumerate(model.calls):
        assert kw["seed"] == 42 + i  # one call per image: each PNG's seed reproduces it
        assert (kw["sampler"], kw["steps"], kw["guidance_scale"]) == ("ddim", 3, 2.5)
        assert (kw["negative_prompt"], kw["width"], kw["height"]) == ("blurry", 16, 24)
        assert kw["init_image"] is None and kw["mask"] is None and kw["strength"] is None
    assert seen == [(k, 6) for k in range(1, 7)]  # per step, over the whole batch
    assert [p.relative_to(ctx.outdir).as_posix() for p in result.paths] == [
        "txt2img/00000.png",
        "txt2img/00001.png",
    ]
    assert [read_params(p)["seed"] for p in result.paths] == [42, 43]


def test_other_tools_sampler_names_run_their_sampler(fake) -> None:
    """A1111's "DPM++ 2M Karras" (as read back from its PNG info) is dpmpp_2m with Karras sigmas."""
    ctx, model = fake
    result = generate_images(ctx, Settings(prompt="x", sampler="DPM++ 2M Karras", steps=2))
    _, kw = model.calls[-1]
    assert kw["sampler"] == "dpmpp_2m" and kw["karras"] is True
    assert read_params(result.paths[0])["karras"] is True


def test_unset_fields_are_the_models_defaults(fake) -> None:
    ctx, model = fake
    result = generate_images(ctx, Settings(prompt="x", seed=1, steps=0, sampler=""))
    _, kw = model.calls[0]
    assert (kw["sampler"], kw["steps"], kw["guidance_scale"]) == ("dpmpp_2m", 20, 4.0)
    assert kw["width"] is None and kw["height"] is None
    assert result.params[0]["scale"] == 4.0
    assert model_defaults(ctx, None) == {
        "sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 4.0, "width": 8, "height": 8,
    }  # fmt: skip


def test_images_carry_the_commands_metadata(shapes: UiContext) -> None:
    settings = Settings(prompt="a blue square", negative_prompt="green", steps=2, seed=7)
    result = generate_images(shapes, settings)
    (path,) = result.paths
    meta = read_params(path)
    assert meta["prompt"] == "a blue square" and meta["negative_prompt"] == "green"
    assert (meta["seed"], meta["steps"], meta["sampler"]) == (7, 2, "dpmpp_2m")
    assert meta["model"] == "shapes.ckpt" and len(meta["model_hash"]) == 10
    assert meta["mode"] == "txt2img" and meta["size"] == "32x32"
    with Image.open(path) as im:
        assert im.size == (32, 32)
        assert im.text["parameters"].startswith("a blue square\nNegative prompt: green\n")
    assert "seed 7" in result.summary()


def test_random_seed_then_reuse_last_reproduces_the_image(shapes: UiContext) -> None:
    first = generate_images(shapes, Settings(prompt="a circle", steps=2, seed=RANDOM_SEED))
    again = generate_images(shapes, Settings(prompt="a circle", steps=2, seed=RANDOM_SEED))
    assert first.seed != again.seed  # -1: a new random seed each time
    assert reuse_seed(None) == RANDOM_SEED
    reused = generate_images(
        shapes, Settings(prompt="a circle", steps=2, seed=reuse_seed(first.seed))
    )
    assert read_params(reused.paths[0])["seed"] == first.seed
    a = np.asarray(Image.open(first.paths[0]))
    assert np.array_equal(a, np.asarray(Image.open(reused.paths[0])))
    assert not np.array_equal(a, np.asarray(Image.open(again.paths[0])))


def test_png_restore_round_trip(shapes: UiContext) -> None:
    settings = Settings(
        prompt="a big red triangle sparkle", negative_prompt="noise", sampler="euler",
        steps=3, guidance_scale=3.0, seed=11, width=32, height=32,
        loras=["purple"], lora_scale=0.5, embeddings=["sparkle"],
    )  # fmt: skip
    result = generate_images(shapes, settings)
    meta = read_params(result.paths[0])
    assert meta["loras"][0]["name"] == "purple" and meta["loras"][0]["scale"] == 0.5
    assert meta["embeddings"][0]["name"] == "sparkle" and "Lora hashes" in meta
    restored = settings_from_png(
        result.paths[0], shapes.models.names, shapes.loras, shapes.embeddings
    )
    assert restored.pop("notes") == []
    assert restored == {
        "prompt": "a big red triangle sparkle", "negative_prompt": "noise", "sampler": "euler",
        "steps": 3, "guidance_scale": 3.0, "seed": 11, "width": 32, "height": 32,
        "mode": "txt2img", "checkpoint": "shapes.ckpt", "loras": ["purple"], "lora_scale": 0.5,
        "embeddings": ["sparkle"],
    }  # fmt: skip
    again = generate_images(shapes, Settings(**restored))
    assert np.array_equal(
        np.asarray(Image.open(result.paths[0])), np.asarray(Image.open(again.paths[0]))
    )
    plain = generate_images(shapes, Settings(**{**restored, "loras": []}))
    assert not np.array_equal(
        np.asarray(Image.open(result.paths[0])), np.asarray(Image.open(plain.paths[0]))
    )  # the LoRA took part


def test_restore_names_what_this_server_lacks(tmp_path: Path) -> None:
    params = {
        "prompt": "p", "seed": 3, "model": "other.ckpt", "mode": "img2img", "strength": 0.4,
        "loras": [{"name": "gone", "scale": 1.0, "hash": "x"}],
    }  # fmt: skip
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", params)
    restored = settings_from_png(path, ["shapes.ckpt"], {}, {})
    assert restored["mode"] == "img2img" and restored["strength"] == 0.4
    assert "checkpoint" not in restored and restored["loras"] == []
    assert restored["notes"] == [
        "checkpoint other.ckpt is not offered here",
        "LoRA gone is not offered here",
    ]
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(UiError, match="carries no ldm settings"):
        settings_from_png(tmp_path / "plain.png")


def test_img2img_and_inpaint_record_their_mode(shapes: UiContext, tmp_path: Path) -> None:
    from ldm.data.shapes import render

    # an image the shipped first stage can encode (a shape on black; a flat colour it cannot),
    # the shape in the half that gets painted over
    shape = {"size": "large", "colour": "red", "shape": "square", "position": "left"}
    init = Image.fromarray(render(shape, 32))
    init.save(tmp_path / "init.png")
    out = generate_images(
        shapes, Settings(mode="img2img", prompt="x", steps=4, seed=1, strength=0.5),
        init_image=tmp_path / "init.png",
    )  # fmt: skip
    meta = read_params(out.paths[0])
    assert (meta["mode"], meta["strength"]) == ("img2img", 0.5)
    assert out.paths[0].parent.name == "img2img"
    stroke = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 255), (0, 0, 16, 32))  # the left half painted
    stroke.save(tmp_path / "layer.png")
    value = {"background": str(tmp_path / "init.png"), "layers": [str(tmp_path / "layer.png")]}
    image, mask = editor_inputs(value, 1 << 20)
    assert np.asarray(mask)[:, :16].min() == 255 and np.asarray(mask)[:, 16:].max() == 0
    painted = generate_images(
        shapes, Settings(mode="inpaint", prompt="x", steps=3, seed=1, strength=1.0),
        init_image=image, mask=mask,
    )  # fmt: skip
    result = np.asarray(Image.open(painted.paths[0])).astype(int)
    assert read_params(painted.paths[0])["mode"] == "inpaint"
    kept = np.abs(result[:, 20:] - np.asarray(init)[:, 20:]).mean()
    repainted = np.abs(result[:, :12] - np.asarray(init)[:, :12]).mean()
    assert kept < 12 and kept < repainted  # the unpainted half stays close to the image
    with pytest.raises(UiError, match="needs an image"):
        generate_images(shapes, Settings(mode="img2img", prompt="x"))
    with pytest.raises(UiError, match="Paint over"):
        mask_from_layers([Image.new("RGBA", (8, 8))], (8, 8))


def test_checkpoints_load_lazily_one_at_a_time(tmp_path: Path) -> None:
    for name in ("a.ckpt", "b.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    table = checkpoint_table(None, str(tmp_path))
    assert list(table) == ["a.ckpt", "b.safetensors", "pipe"]
    loads: list[str] = []
    slot = ModelSlot(table, loader=lambda path, device: loads.append(path.name) or path.name)
    assert loads == []  # nothing loaded until used
    assert slot.get() == "a.ckpt" and slot.get("a.ckpt") == "a.ckpt"
    assert slot.get("pipe") == "pipe" and slot.name == "pipe"
    assert loads == ["a.ckpt", "pipe"]
    with pytest.raises(UiError, match="Unknown checkpoint 'c.ckpt'"):
        slot.get("c.ckpt")
    with pytest.raises(UiError, match="No checkpoint to serve"):
        checkpoint_table(None, None)


def test_unknown_adapters_and_bad_settings_are_errors(fake) -> None:
    ctx, _ = fake
    with pytest.raises(UiError, match="Unknown LoRA nope"):
        generate_images(ctx, Settings(prompt="x", loras=["nope"]))
    with pytest.raises(UiError, match="Unknown sampler"):
        generate_images(ctx, Settings(prompt="x", sampler="warp9"))
    with pytest.raises(UiError, match="Batch must be"):
        Settings(batch=99)
    with pytest.raises(UiError, match="Strength"):
        Settings(mode="img2img", strength=1.5)


def test_listen_requires_auth(shapes_ckpt: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", str(shapes_ckpt), "--listen"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-ui: error: --listen") and "--auth user:password" in err
    with pytest.raises(UiError, match="give --auth user:password"):
        server_name(True, None)
    assert server_name(False, None) == "127.0.0.1"
    assert server_name(True, ("u", "p")) == "0.0.0.0"
    assert parse_auth("alice:pa:ss") == ("alice", "pa:ss")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(UiError, match="user:password"):
            parse_auth(bad)
    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", str(shapes_ckpt), "--auth", "nopassword"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", "missing.ckpt"])
    assert exit_.value.code == 2 and "no such file" in capsys.readouterr().err
    args = build_parser().parse_args(["--ckpt", str(shapes_ckpt), "--listen", "--auth", "a:b"])
    assert configure(args)["host"] == "0.0.0.0" and configure(args)["auth"] == ("a", "b")
    assert configure(build_parser().parse_args(["--ckpt", str(shapes_ckpt)]))["port"] == 7860
    with pytest.raises(UiError, match="--threads"):
        configure(build_parser().parse_args(["--ckpt", str(shapes_ckpt), "--threads", "0"]))


def test_uploads_are_decoded_as_images_only(fake, tmp_path: Path) -> None:
    ctx, _ = fake
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(UiError, match="not an image this UI reads"):
        decode_upload(text)
    svg = tmp_path / "x.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    with pytest.raises(UiError, match="not an image"):
        decode_upload(svg)
    cut = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    cut.write_bytes((tmp_path / "whole.png").read_bytes()[:-30])
    with pytest.raises(UiError, match="not an image"):
        decode_upload(cut)
    with pytest.raises(UiError, match="at most 9.54e-06 MB are accepted"):
        decode_upload(tmp_path / "whole.png", max_bytes=10)
    with pytest.raises(UiError, match="pixels"):
        decode_upload(tmp_path / "whole.png", max_pixels=100)
    assert decode_upload(tmp_path / "whole.png").size == (64, 64)
    with pytest.raises(UiError, match="init image is not an image"):
        generate_images(ctx, Settings(mode="img2img", prompt="x"), init_image=text)
    with pytest.raises(UiError, match="PNG is not an image"):
        settings_from_png(text)
