"""``python -m ldm.ui`` / ``ldm-ui``: flags, safety checks, then serve the page (docs/ui.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ldm.ui.errors import UiError
from ldm.ui.safety import DEFAULT_MAX_UPLOAD_MB, parse_auth, server_name

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7860
#: at most this many people wait in the queue (more get "queue full")
MAX_QUEUE = 32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-ui",
        description="A web page for txt2img / img2img / inpaint sampling (gradio), on 127.0.0.1 "
        "unless --listen.",
    )
    p.add_argument("--ckpt", type=str, default=None, help="checkpoint served first (.ckpt / "
                   ".safetensors / diffusers folder)")  # fmt: skip
    p.add_argument("--ckpt-dir", dest="ckpt_dir", type=str, default=None,
                   help="folder of checkpoints to choose from (loaded one at a time, on use)")  # fmt: skip
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--listen", action="store_true",
                   help="serve on every interface (0.0.0.0); needs --auth")  # fmt: skip
    p.add_argument("--auth", type=str, default=None, metavar="USER:PASSWORD",
                   help="log-in required to use the page")  # fmt: skip
    p.add_argument("--device", type=str, default=None,
                   help="cpu, cuda, cuda:1, mps, ... (default: cuda, else mps, else cpu)")  # fmt: skip
    p.add_argument("--outdir", type=str, default="outputs/ui",
                   help="where images are written (the only folder the page serves)")  # fmt: skip
    p.add_argument("--lora-dir", dest="lora_dir", type=str, default=None,
                   help="folder of LoRA .safetensors files for the LoRA picker")  # fmt: skip
    p.add_argument("--embedding-dir", dest="embedding_dir", type=str, default=None,
                   help="folder of textual-inversion files for the embedding picker")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 suits small models on a busy "
                   "CPU)")  # fmt: skip
    p.add_argument("--max-upload-mb", dest="max_upload_mb", type=float,
                   default=DEFAULT_MAX_UPLOAD_MB, help="largest upload accepted (MB)")  # fmt: skip
    return p


def configure(args: argparse.Namespace) -> dict[str, Any]:
    """The checked flags as the pieces ``serve`` needs; a UiError names a wrong flag."""
    from ldm.ui.adapter_files import embedding_files, lora_files
    from ldm.ui.handlers import UiContext
    from ldm.ui.models import ModelSlot, checkpoint_table

    auth = parse_auth(args.auth)
    host = server_name(args.listen, auth)
    if not 0 < args.port < 65536:
        raise UiError(f"--port {args.port}: must be in 1..65535.")
    if args.max_upload_mb <= 0:
        raise UiError("--max-upload-mb must be positive.")
    if args.threads is not None:
        if args.threads < 1:
            raise UiError("--threads must be at least 1.")
        import torch

        torch.set_num_threads(args.threads)
    if args.device:
        import torch

        try:
            torch.device(args.device)
        except RuntimeError as err:
            raise UiError(f"--device {args.device}: {err}") from None
    ctx = UiContext(
        models=ModelSlot(checkpoint_table(args.ckpt, args.ckpt_dir), device=args.device),
        outdir=Path(args.outdir).resolve(),
        loras=lora_files(args.lora_dir),
        embeddings=embedding_files(args.embedding_dir),
        max_upload_bytes=int(args.max_upload_mb * 2**20),
    )
    return {"ctx": ctx, "host": host, "port": args.port, "auth": auth}


def serve(ctx: Any, host: str, port: int, auth: tuple[str, str] | None, block: bool = True) -> Any:
    """Build and launch the app: gradio's cache inside the output folder, which is all it serves
    (no outside URL fetched either); uploads capped; one generation at a time (the queue shows
    each waiting person's position)."""
    cache = ctx.outdir / ".gradio"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # uploads and the gallery's copies
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(cache / "examples")
    from starlette.middleware import Middleware

    from ldm.ui.app import build_app
    from ldm.ui.no_outside_urls import NoOutsideUrls

    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE, api_open=False)
    logger.info(
        "Serving %s on http://%s:%d (images in %s)", ctx.models.names, host, port, ctx.outdir
    )
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        allowed_paths=[str(ctx.outdir)],
        max_file_size=ctx.max_upload_bytes,
        prevent_thread_lock=not block,
        inbrowser=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        footer_links=[],
        show_error=False,
        app_kwargs={
            "middleware": [Middleware(NoOutsideUrls)]
        },  # unexpected errors: logged here, a plain "Error" there
    )
    return demo


def main(argv: list[str] | None = None) -> int:
    """Console entry: a wrong flag prints one line to stderr and exits 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = configure(args)
    except UiError as err:
        parser.exit(2, f"ldm-ui: error: {err}\n")
    try:
        serve(**settings)
    except ImportError as err:
        sys.stderr.write(f"ldm-ui: error: {err}\n")
        return 2
    except OSError as err:  # the port is taken, or the address cannot be bound
        sys.stderr.write(f"ldm-ui: error: cannot serve on port {args.port}: {err}\n")
        return 2
    return 0
