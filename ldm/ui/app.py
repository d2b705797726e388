"""The gradio page: txt2img / img2img / inpaint tabs, settings, gallery, PNG drop, over the handlers.

Element ids (``elem_id``) name the parts a browser test or a user script needs: ``prompt``,
``negative-prompt``, ``sampler``, ``steps``, ``guidance``, ``seed``, ``checkpoint``, ``png-drop``, ``gallery``, ``info`` and the buttons
``txt2img-generate``, ``img2img-generate``, ``inpaint-generate``, ``send-img2img``,
``send-inpaint``, ``seed-random``, ``seed-reuse``.
"""

# no ``from __future__ import annotations``: gradio reads the ``gr.SelectData`` annotation of the
# gallery's select handler, which names the gradio module imported inside build_app
import functools
import logging
from collections.abc import Callable
from typing import Any

from ldm.ui import require_gradio
from ldm.ui.errors import UiError
from ldm.ui.handlers import UiContext, generate_images, model_defaults
from ldm.ui.masks import editor_inputs
from ldm.ui.restore import settings_from_png
from ldm.ui.settings import MAX_BATCH, RANDOM_SEED, Settings, reuse_seed

logger = logging.getLogger(__name__)

#: events that touch the model share one queue: one generation (or load) at a time
MODEL_QUEUE = "model"


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is for the person at the page (shown, no traceback)."""
    from ldm.checkpoint.report import CheckpointMismatchError
    from ldm.checkpoint.safe_load import UnsafeCheckpointError

    return (UiError, ValueError, FileNotFoundError, CheckpointMismatchError, UnsafeCheckpointError)


def _shown(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with user mistakes raised as gr.Error (a message box on the page)."""
    gr = require_gradio()
    errors = user_errors()

    @functools.wraps(fn)  # the signature too: gradio finds gr.Progress in it
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors as err:
            raise gr.Error(str(err)) from None

    return wrapped


def build_app(ctx: UiContext) -> Any:
    """The gradio Blocks of the UI (not launched; see ``ldm.ui.cli.serve``)."""
    gr = require_gradio()
    from ldm.samplers import SAMPLERS

    samplers = sorted(SAMPLERS)
    with gr.Blocks(title="ldm", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        last_seed = gr.State(None)
        results = gr.State([])  # the gallery's PNGs in the output folder
        selected = gr.State(0)  # the gallery image picked for "send to"
        with gr.Row():
            checkpoint = gr.Dropdown(
                ctx.models.names,
                value=ctx.models.default,
                label="Checkpoint (loaded on first use, one at a time)",
                elem_id="checkpoint",
                scale=3,
            )
            png_drop = gr.File(
                label="Drop one of our PNGs here to restore its settings",
                file_types=[".png"],
                elem_id="png-drop",
                height=130,
                scale=2,
            )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                with gr.Tabs(selected="txt2img") as tabs:
                    with gr.Tab("txt2img", id="txt2img"):
                        txt_go = gr.Button(
                            "Generate", variant="primary", elem_id="txt2img-generate"
                        )
                    with gr.Tab("img2img", id="img2img"):
                        init_image = gr.Image(
                            type="filepath",
                            image_mode=None,  # the file as uploaded; decoded by the handler
                            sources=["upload", "clipboard"],
                            label="Init image",
                            elem_id="init-image",
                        )
                        img_strength = gr.Slider(0.01, 1.0, 0.75, step=0.01, label="Strength")
                        img_go = gr.Button(
                            "Generate", variant="primary", elem_id="img2img-generate"
                        )
                    with gr.Tab("inpaint", id="inpaint"):
                        editor = gr.ImageEditor(
                            type="filepath",
                            format="png",
                            sources=["upload", "clipboard"],
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                            layers=False,
                            label="Image: paint over the area to repaint",
                            elem_id="inpaint-editor",
                        )
                        inp_strength = gr.Slider(0.01, 1.0, 1.0, step=0.01, label="Strength")
                        inp_go = gr.Button(
                            "Generate", variant="primary", elem_id="inpaint-generate"
                        )
                with gr.Row():
                    sampler = gr.Dropdown(
                        samplers, value="dpmpp_2m", label="Sampler", elem_id="sampler"
                    )
                    steps = gr.Slider(1, 150, 20, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(
                        0.0, 30.0, 7.5, step=0.5, label="Guidance", elem_id="guidance"
                    )
                with gr.Row():
                    width = gr.Slider(8, 2048, 512, step=8, label="Width")
                    height = gr.Slider(8, 2048, 512, step=8, label="Height")
                    batch = gr.Slider(1, MAX_BATCH, 1, step=1, label="Batch")
                with gr.Row():
                    seed = gr.Number(
                        RANDOM_SEED, precision=0, label="Seed (-1: random)", elem_id="seed"
                    )
                    seed_random = gr.Button("Random", elem_id="seed-random", scale=0)
                    seed_reuse = gr.Button("Reuse last", elem_id="seed-reuse", scale=0)
                with gr.Row(visible=bool(ctx.loras or ctx.embeddings)):
                    loras = gr.Dropdown(
                        list(ctx.loras),
                        value=[],
                        multiselect=True,
                        label="LoRAs",
                        visible=bool(ctx.loras),
                        elem_id="loras",
                    )
                    lora_scale = gr.Slider(
                        -2.0, 2.0, 1.0, step=0.05, label="LoRA scale", visible=bool(ctx.loras)
                    )
                    embeddings = gr.Dropdown(
                        list(ctx.embeddings),
                        value=[],
                        multiselect=True,
                        label="Embeddings (the file name is the prompt token)",
                        visible=bool(ctx.embeddings),
                        elem_id="embeddings",
                    )
            with gr.Column(scale=1):
                gallery = gr.Gallery(
                    label="Images",
                    format="png",
                    columns=2,
                    height=420,
                    elem_id="gallery",
                    object_fit="contain",
                )
                with gr.Row():
                    send_img2img = gr.Button("Send to img2img", elem_id="send-img2img")
                    send_inpaint = gr.Button("Send to inpaint", elem_id="send-inpaint")
                info = gr.Markdown(elem_id="info")

        common = {
            checkpoint, prompt, negative, sampler, steps, guidance, width, height, seed, batch,
            loras, lora_scale, embeddings,
        }  # fmt: skip

        def settings(data: dict[Any, Any], mode: str, strength: Any = None) -> Settings:
            return Settings(
                mode=mode,
                prompt=data[prompt] or "",
                negative_prompt=data[negative] or "",
                checkpoint=data[checkpoint],
                sampler=data[sampler],
                steps=data[steps],
                guidance_scale=data[guidance],
                seed=data[seed],
                width=data[width],
                height=data[height],
                batch=data[batch],
                strength=strength,
                loras=data[loras] or [],
                lora_scale=data[lora_scale],
                embeddings=data[embeddings] or [],
            )

        def shown(result: Any) -> dict[Any, Any]:
            images = [(str(p), f"seed {m['seed']}") for p, m in zip(result.paths, result.params)]
            lines = [result.summary()] + [f"`{p.relative_to(ctx.outdir)}`" for p in result.paths]
            return {
                gallery: images,
                info: "  \n".join(lines),
                last_seed: result.seed,
                results: [str(p) for p in result.paths],
                selected: 0,
            }

        def progress_of(progress: Any) -> Callable[[int, int], None]:
            return lambda done, total: progress((done, total), desc="Sampling", unit="steps")

        def run_txt2img(data: dict[Any, Any], progress=gr.Progress()) -> dict[Any, Any]:  # noqa: B008
            result = generate_images(ctx, settings(data, "txt2img"), progress=progress_of(progress))
            return shown(result)

        def run_img2img(data: dict[Any, Any], progress=gr.Progress()) -> dict[Any, Any]:  # noqa: B008
            result = generate_images(
                ctx,
                settings(data, "img2img", data[img_strength]),
                init_image=data[init_image],
                progress=progress_of(progress),
            )
            return shown(result)

        def run_inpaint(data: dict[Any, Any], progress=gr.Progress()) -> dict[Any, Any]:  # noqa: B008
            init, mask = editor_inputs(data[editor], ctx.max_upload_bytes)
            result = generate_images(
                ctx,
                settings(data, "inpaint", data[inp_strength]),
                init_image=init,
                mask=mask,
                progress=progress_of(progress),
            )
            return shown(result)

        outputs = [gallery, info, last_seed, results, selected]
        for button, fn, extra in (
            (txt_go, run_txt2img, set()),
            (img_go, run_img2img, {init_image, img_strength}),
            (inp_go, run_inpaint, {editor, inp_strength}),
        ):
            button.click(
                _shown(fn),
                inputs=common | extra,
                outputs=outputs,
                concurrency_limit=1,
                concurrency_id=MODEL_QUEUE,
                api_visibility="private",
            )

        def defaults(name: str) -> dict[Any, Any]:
            d = model_defaults(ctx, name)
            return {
                sampler: d["sampler"],
                steps: d["steps"],
                guidance: d["guidance_scale"],
                width: d["width"],
                height: d["height"],
                info: f"{name}: loaded; its defaults are set.",
            }

        model_fields = [sampler, steps, guidance, width, height, info]
        for event in (demo.load, checkpoint.input):
            event(
                _shown(defaults),
                inputs=checkpoint,
                outputs=model_fields,
                concurrency_limit=1,
                concurrency_id=MODEL_QUEUE,
                api_visibility="private",
            )

        local = {"queue": False, "api_visibility": "private"}  # page-only, no API
        seed_random.click(lambda: RANDOM_SEED, None, seed, **local)
        seed_reuse.click(reuse_seed, last_seed, seed, **local)

        def pick(evt: gr.SelectData) -> int:
            return int(evt.index)

        gallery.select(pick, None, selected, **local)

        def chosen(paths: list[str], index: int) -> str:
            if not paths:
                raise gr.Error("Generate an image first: the gallery is empty.")
            return paths[min(int(index or 0), len(paths) - 1)]

        def to_img2img(paths: list[str], index: int) -> tuple[Any, Any]:
            return chosen(paths, index), gr.Tabs(selected="img2img")

        def to_inpaint(paths: list[str], index: int) -> tuple[Any, Any]:
            path = chosen(paths, index)
            value = {"background": path, "layers": [], "composite": path}
            return value, gr.Tabs(selected="inpaint")

        send_img2img.click(to_img2img, [results, selected], [init_image, tabs], **local)
        send_inpaint.click(to_inpaint, [results, selected], [editor, tabs], **local)

        fields = {
            "prompt": prompt,
            "negative_prompt": negative,
            "checkpoint": checkpoint,
            "steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "width": width,
            "height": height,
            "loras": loras,
            "lora_scale": lora_scale,
            "embeddings": embeddings,
        }

        def restore(path: str | None) -> dict[Any, Any]:
            if path is None:
                return {}
            s = settings_from_png(
                path, ctx.models.names, ctx.loras, ctx.embeddings, ctx.max_upload_bytes
            )
            out: dict[Any, Any] = {fields[k]: v for k, v in s.items() if k in fields}
            notes = list(s["notes"])
            if s.get("sampler") in SAMPLERS:
                out[sampler] = s["sampler"]
            elif "sampler" in s:
                notes.append(f"sampler {s['sampler']} is not available here")
            mode = s.get("mode", "txt2img")
            if "strength" in s:
                out[inp_strength if mode == "inpaint" else img_strength] = s["strength"]
            out[tabs] = gr.Tabs(selected=mode)
            text = "Settings restored from the PNG."
            out[info] = text + ("  \nNot restored: " + "; ".join(notes) if notes else "")
            return out

        png_drop.upload(
            _shown(restore),
            inputs=png_drop,
            outputs=[*fields.values(), sampler, img_strength, inp_strength, tabs, info],
            **local,
        )
    return demo
