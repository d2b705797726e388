"""The gradio page builds without a browser: one model queue of one, nothing exposed as an API."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ldm.ui.handlers import UiContext
from ldm.ui.models import ModelSlot

pytest.importorskip("gradio", reason="the web UI's extra: pip install 'ldm[ui]'")


def test_model_events_share_one_queue_of_one(tmp_path: Path) -> None:
    from ldm.ui.app import MODEL_QUEUE, build_app

    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"x")
    loads: list[Path] = []
    slot = ModelSlot({"a.ckpt": ckpt}, loader=lambda path, device: loads.append(path))
    ctx = UiContext(models=slot, outdir=tmp_path)
    demo = build_app(ctx)
    fns = {fn.name: fn for fn in demo.fns.values()}
    for name in ("run_txt2img", "run_img2img", "run_inpaint", "defaults"):
        assert fns[name].concurrency_limit == 1 and fns[name].concurrency_id == MODEL_QUEUE
    assert {fn.api_visibility for fn in demo.fns.values()} == {"private"}
    assert loads == []  # building the page loads no model


def test_a_missing_gradio_names_the_extra(monkeypatch) -> None:
    from ldm.ui import require_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'ldm\[ui\]'"):
        require_gradio()


def test_file_requests_for_outside_urls_are_refused() -> None:
    from ldm.ui.no_outside_urls import asks_for_outside_url

    assert asks_for_outside_url("/gradio_api/file=https://example.com/a.png")
    assert asks_for_outside_url("/gradio_api/file=HTTP:/example.com")
    assert not asks_for_outside_url("/gradio_api/file=/srv/out/txt2img/00000.png")
    assert not asks_for_outside_url("/gradio_api/queue/join")
