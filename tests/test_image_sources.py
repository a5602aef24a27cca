"""Tests for `llama4x.image_sources.open_image`: files, http(s) URLs (a local server) and base64 text open to the
same image, upright by EXIF as transformers' `load_image` turns it, transparency kept for the image processor to
composite on white; missing, unreadable and oversized sources name themselves."""

import base64
import functools
import http.server
import threading

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image

from llama4x import Llama4XImageProcessor
from llama4x.image_sources import open_image


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The URL of `tmp_path` served over http on this machine."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy from the environment must not take local requests
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def half_transparent_png(path):
    """40x60 RGBA: opaque red on the left, fully transparent black on the right."""
    pixels = np.zeros((60, 40, 4), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0, 255)
    Image.fromarray(pixels).save(path)
    return path


def test_files_urls_and_base64_open_to_the_same_pixels(tmp_path, served):
    path = half_transparent_png(tmp_path / "half.png")
    encoded = base64.b64encode(path.read_bytes()).decode()
    sources = [path, str(path), f"{served}/half.png", encoded, f"data:image/png;base64,{encoded}"]
    opened = [open_image(source, max_pixels=0) for source in sources]
    assert all(image.mode == "RGBA" and image.size == (40, 60) for image in opened)
    for image in opened[1:]:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(opened[0]))


def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path):
    path = tmp_path / "rotated.jpg"
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white band on the left: where it ends up tells the rotation
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    ours = open_image(path, max_pixels=0)
    reference = load_image(str(path))
    assert ours.size == reference.size == (20, 60)
    np.testing.assert_array_equal(np.asarray(ours.convert("RGB")), np.asarray(reference))


def test_the_image_processor_opens_sources_and_composites_transparency_on_white(tmp_path):
    path = half_transparent_png(tmp_path / "half.png")
    processor = Llama4XImageProcessor(size=28, max_patches=1)
    from_path = processor(str(path), return_tensors="pt")["pixel_values"]
    from_pil = processor(Image.open(path), return_tensors="pt")["pixel_values"]
    assert np.array_equal(from_path.numpy(), from_pil.numpy())
    # (1 tile, 3, 28, 28), normalised to [-1, 1]; the image is resized to 19x28 (width x height) and padded black on
    # the right: red columns 0..8, white (the transparent half) from column 10, black padding from column 19
    red, white = from_path[0, :, :, 3], from_path[0, :, :, 15]
    assert red[0].eq(1.0).all() and red[1:].eq(-1.0).all()
    assert white.eq(1.0).all()


def test_bad_sources_raise_errors_that_name_them(tmp_path, served):
    good = tmp_path / "good.png"
    Image.effect_noise((30, 20), 64).save(good)  # noise: does not compress to a few bytes
    assert open_image(good, max_pixels=600).mode == "L"  # the mode is kept: the image processor converts
    with pytest.raises(ValueError, match=r"30x20 = 600 pixels, over max_image_pixels=599"):
        open_image(good, max_pixels=599)
    with pytest.raises(ValueError, match=r"30x20 = 600 pixels, over max_image_pixels=599"):
        open_image(f"{served}/good.png", max_pixels=599)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.png"
    text.write_text("hello")
    for path in (truncated, text):
        with pytest.raises(ValueError, match=f"Cannot read .*{path.name} as an image"):
            open_image(path, max_pixels=0)
    with pytest.raises(ValueError, match="absent.png does not exist"):
        open_image(tmp_path / "absent.png", max_pixels=0)
    with pytest.raises(ValueError, match=r"Image file absent.png does not exist \(nor is it an http\(s\) URL"):
        open_image("absent.png", max_pixels=0)
    with pytest.raises(
        ValueError, match=r"Cannot download the image http://127.0.0.1:\d+/absent.png \(HTTP Error 404"
    ):
        open_image(f"{served}/absent.png", max_pixels=0)
    with pytest.raises(ValueError, match=r"Cannot read 'aGVsbG8=' \(not a file: read as base64 data\) as an image"):
        open_image(base64.b64encode(b"hello").decode(), max_pixels=0)
