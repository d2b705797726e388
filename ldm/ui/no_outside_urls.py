"""An ASGI guard: the server never fetches outside URLs for a page (gradio's ``/file=<http URL>``
route would stream any public URL through the server; here it answers 403 instead)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MESSAGE = b"This server serves its own files only; it does not fetch outside URLs."


def asks_for_outside_url(path: str) -> bool:
    """True for ``.../file=http://...`` (any case, any slashes after the scheme)."""
    _, sep, target = path.partition("/file=")
    return bool(sep) and target.lstrip().lower().startswith(("http:", "https:"))


class NoOutsideUrls:
    """Middleware answering 403 to file requests that name an http(s) URL."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and asks_for_outside_url(scope.get("path", "")):
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": MESSAGE})
            return
        await self.app(scope, receive, send)
