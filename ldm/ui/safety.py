"""Safety rules of the web UI: where it binds, who may log in, what an upload may be."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ldm.ui.errors import UiError

LOCAL_HOST = "127.0.0.1"
ANY_HOST = "0.0.0.0"
#: formats an upload may be decoded as (PIL plugins that never call out to other programs)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
#: the most pixels an uploaded image may have (4096 x 4096)
MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_UPLOAD_MB = 20


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``user:password`` -> (user, password); None stays None."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UiError("--auth takes user:password (both non-empty), e.g. --auth alice:s3cret.")
    return user, password


def server_name(listen: bool, auth: tuple[str, str] | None) -> str:
    """127.0.0.1, or 0.0.0.0 with --listen, which needs --auth: nobody else may sample unasked."""
    if not listen:
        return LOCAL_HOST
    if auth is None:
        raise UiError(
            "--listen serves the UI on every network interface: give --auth user:password too "
            "(or leave out --listen to keep it on 127.0.0.1)."
        )
    return ANY_HOST


def decode_upload(
    path: str | Path,
    max_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20,
    max_pixels: int = MAX_PIXELS,
    what: str = "upload",
) -> Image.Image:
    """An uploaded file decoded as an image only (PNG, JPEG, WebP, BMP or GIF): too large, not an
    image or a damaged one is a UiError naming the problem. The image comes back fully loaded."""
    path = Path(path)
    if not path.is_file():
        raise UiError(f"The {what} is missing (was it removed from the server?).")
    size = path.stat().st_size
    if size > max_bytes:
        raise UiError(
            f"The {what} is {size / 2**20:.1f} MB; at most {max_bytes / 2**20:.3g} MB are accepted."
        )
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise UiError(
                    f"The {what} is {w}x{h} pixels; at most {max_pixels} pixels are accepted."
                )
            im.verify()  # structure and checksums, before any pixel is decoded
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            im.load()
            return im.copy()
    except UiError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UiError(
            f"The {what} is not an image this UI reads ({', '.join(IMAGE_FORMATS)}): {err}"
        ) from None
