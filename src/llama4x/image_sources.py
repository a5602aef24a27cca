"""Opening an image from where a user names it: a local file, an http(s) URL, or base64 data (a `data:image/...`
URI or bare base64), the sources transformers' chat templates pass on (`{"type": "image", "path" | "url" |
"base64" | "image": ...}`) and the command line takes.

The image keeps its mode, transparency included (the image processor composites it on white, whatever the source),
and is turned upright by its EXIF orientation, as transformers' `load_image` does. Its size is checked from the
header, before the pixels are decoded (decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.request
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

URL_TIMEOUT_S = 30.0


def is_image_source(item: object) -> bool:
    """Whether `item` names an image rather than holding one: a path, a URL or base64 text."""
    return isinstance(item, (str, os.PathLike))


def open_image(source: str | os.PathLike, max_pixels: int) -> Image.Image:
    """Decode the image named by `source`, upright; a `ValueError` naming the source if it is missing, not an image,
    corrupt, unreachable, or has more than `max_pixels` pixels (0: no limit)."""
    name, data = _read(source)
    try:
        with Image.open(data) as image:
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                raise ValueError(
                    f"Image {name} has {width}x{height} = {width * height} pixels, over max_image_pixels={max_pixels} "
                    "(a guard against decompression bombs)."
                )
            return ImageOps.exif_transpose(image)  # a decoded copy: usable after the file is closed
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL's errors for unreadable or truncated data
        raise ValueError(f"Cannot read {name} as an image ({error}).") from error


def _read(source: str | os.PathLike) -> tuple[str, Path | io.BytesIO]:
    """`(a name for error messages, something PIL opens)`."""
    if isinstance(source, os.PathLike) or os.path.isfile(source):
        if not os.path.isfile(source):
            raise ValueError(f"Image file {source} does not exist.")
        return str(source), Path(source)
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as response:
                return source, io.BytesIO(response.read())
        except OSError as error:  # URLError, HTTPError and timeouts are OSErrors
            raise ValueError(f"Cannot download the image {source} ({error}).") from error
    shown = source if len(source) <= 80 else source[:77] + "..."
    encoded = source.split(",", 1)[1] if source.startswith("data:image/") else source
    try:
        return f"{shown!r} (not a file: read as base64 data)", io.BytesIO(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError) as error:
        raise ValueError(
            f"Image file {shown} does not exist (nor is it an http(s) URL or base64 image data)."
        ) from error
