"""Image processor and processor of llama4x: Llama 4's best-fit tiling and image-token layout, with PIL and numpy only.

`Llama4XImageProcessor` turns images into tiles:

1. RGB: PIL images of any mode, numpy / torch arrays `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in {1, 3, 4}, or
   image sources (a file path, an http(s) URL, base64 text: opened upright by `image_sources.open_image`).
   Transparent images (an alpha band, a palette or tRNS transparent colour, 4-channel arrays) are composited on a
   white background, as transformers' `convert_to_rgb` does. Integer arrays hold 0..255; float arrays hold [0, 1].
2. Best fit (Llama 4): the canvases are the `rows x cols` grids of `size`-pixel tiles with `rows * cols <=
   max_patches`. The image's scale on a canvas is `min(rows * size / height, cols * size / width)` (the limiting
   side: no distortion). Among the canvases that need no downscaling the smallest scale wins (the largest with
   `resize_to_max_canvas=True`); when every canvas needs downscaling, the largest scale wins; ties go to the
   smallest canvas. Scales are rounded as in transformers' processor (float32), so the same canvas wins.
3. Resize without distortion, never upscaling past `max(side, size)` unless `resize_to_max_canvas` (an image
   smaller than a tile grows to one tile, a larger one keeps its pixels), then pad right and bottom with black.
4. Rescale by `rescale_factor` (1/255; with `do_rescale=False` an image keeps its own scale: 0..255 for integers,
   [0, 1] for floats), normalise with `image_mean` / `image_std` (0.5), cut the canvas into its tiles in row-major
   order and, when there is more than one tile, append a global thumbnail: the whole image resized (with distortion)
   to one tile.

`Llama4XProcessor` pairs a tokenizer with the image processor and expands each `<|image|>` of the text into the
layout of Llama 4's processor: `<|image_start|>`, for a multi-tile image one run of `tokens_per_tile` `<|patch|>` per
tile with `<|tile_x_separator|>` between the tiles of a row and `<|tile_y_separator|>` after each row, then `<|image|>`
and the run of the global thumbnail (the only tile of a single-tile image), then `<|image_end|>`. A model replaces
the `<|patch|>` tokens by the tile features in order: `num_tiles * tokens_per_tile` of them per image, with
`tokens_per_tile = ((size // patch_size) * pixel_shuffle_ratio) ** 2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs, ProcessorMixin
from transformers.utils import is_torch_tensor

from .image_sources import is_image_source, open_image
from .tokenization import CHAT_TEMPLATE, special_token_ids

# PIL modes that carry integer or float samples outside 0..255: read as arrays, with the array range rules.
_WIDE_PIL_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_CHANNEL_COUNTS = (1, 3, 4)


class Llama4XImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    max_patches (`int`): the largest number of tiles (global thumbnail not counted) an image is cut into.
    resize_to_max_canvas (`bool`): pick the canvas that allows the largest upscaling instead of the smallest.
    max_image_pixels (`int`): images with more pixels raise a `ValueError` before they are decoded (a guard against
        decompression bombs); 0 disables the check.
    """

    max_patches: int
    resize_to_max_canvas: bool
    max_image_pixels: int


# ---------------------------------------------------------------------------------------------------------------------
# Tiling: pure functions of sizes, rounded as Llama 4's processor rounds.


@dataclass(frozen=True)
class TilingPlan:
    """Where an image of a given size goes: its tile grid and the size it is resized to before padding."""

    grid: tuple[int, int]  # (rows, cols) of tiles
    resized: tuple[int, int]  # (height, width) of the resized image, top-left of the canvas
    tile_size: int

    @property
    def canvas(self) -> tuple[int, int]:
        return self.grid[0] * self.tile_size, self.grid[1] * self.tile_size

    @property
    def num_tiles(self) -> int:
        """Tiles in `pixel_values`: the grid, plus the global thumbnail when the grid has more than one tile."""
        return num_tiles(self.grid)


def num_tiles(grid: Sequence[int]) -> int:
    """Tiles an image with tile grid `(rows, cols)` contributes: `rows * cols`, plus one thumbnail if that is > 1."""
    rows, cols = int(grid[0]), int(grid[1])
    return rows * cols + (1 if rows * cols > 1 else 0)


def supported_grids(max_patches: int) -> list[tuple[int, int]]:
    """Every `(rows, cols)` with `rows * cols <= max_patches`: the canvases Llama 4 considers."""
    return [(rows, cols) for rows in range(1, max_patches + 1) for cols in range(1, max_patches // rows + 1)]


def plan_tiling(
    height: int, width: int, tile_size: int, max_patches: int, resize_to_max_canvas: bool = False
) -> TilingPlan:
    """Llama 4's best-fit canvas for a `height x width` image and the size to resize it to (see the module doc).

    The ratios are rounded as transformers' `Llama4ImageProcessor` rounds them, so that sizes on a rounding boundary
    floor the same way (1200x1600 on at most 4 tiles: 503 rows, not 504): canvas sides are int64 tensors there, so a
    ratio is float32 where a canvas side enters it, and a Python float where the image's own side is the bound.
    """
    grids = supported_grids(max_patches)
    scales = [
        min(_ratio(rows * tile_size, height, True), _ratio(cols * tile_size, width, True)) for rows, cols in grids
    ]
    upscaling = [scale for scale in scales if scale >= 1]
    if upscaling:
        chosen = max(upscaling) if resize_to_max_canvas else min(upscaling)
    else:
        chosen = max(scales)
    # Among canvases with the chosen scale the smallest pads least.
    rows, cols = min((g for g, s in zip(grids, scales) if s == chosen), key=lambda g: g[0] * g[1])

    bound_h, bound_w = rows * tile_size, cols * tile_size
    h_from_canvas = w_from_canvas = True
    if not resize_to_max_canvas:
        # Never upscale past the image's own size, except up to one tile.
        h_from_canvas, w_from_canvas = bound_h < max(height, tile_size), bound_w < max(width, tile_size)
        bound_h, bound_w = min(max(height, tile_size), bound_h), min(max(width, tile_size), bound_w)
    # Fit inside (bound_h, bound_w) keeping the aspect ratio; the limiting side fills its bound.
    scale_h, scale_w = _ratio(bound_h, height, h_from_canvas), _ratio(bound_w, width, w_from_canvas)
    if h_from_canvas or w_from_canvas:  # a float32 tensor compared with a Python float: in float32
        width_limits = np.float32(scale_w) < np.float32(scale_h)
    else:
        width_limits = scale_w < scale_h
    if width_limits:
        new_h, new_w = min(math.floor(type(scale_w)(height) * scale_w), bound_h), bound_w  # product in its precision
    else:
        new_h, new_w = bound_h, min(math.floor(type(scale_h)(width) * scale_h), bound_w)
    return TilingPlan(grid=(rows, cols), resized=(max(new_h, 1), max(new_w, 1)), tile_size=tile_size)


def _ratio(numerator: int, denominator: int, in_float32: bool) -> np.float32 | float:
    """`numerator / denominator` rounded to float32 (as int64 tensors divide) or to a Python float."""
    return np.float32(numerator) / np.float32(denominator) if in_float32 else numerator / denominator


# ---------------------------------------------------------------------------------------------------------------------
# Input conversion: any supported image -> (H, W, 3) uint8, or float32 on the same 0..255 scale.


def _is_array(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or is_torch_tensor(obj)


def _describe(obj: Any) -> str:
    shape = getattr(obj, "shape", None)
    return f"{type(obj).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def flatten_images(images: Any) -> list[Any]:
    """Flatten an image, a batch array `(N, ...)` or (nested) lists of them into a list of single images. An image may
    also be named by its source (a path, URL or base64 text, see `image_sources.py`), opened when it is converted.

    Raises:
        ValueError: for anything that is not an image or an image source, or for an empty input.
    """
    flat: list[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, Image.Image) or is_image_source(item):
            flat.append(item)
        elif _is_array(item):
            if item.ndim in (2, 3):
                flat.append(item)
            elif item.ndim == 4:
                flat.extend(item[i] for i in range(item.shape[0]))
            else:
                raise ValueError(
                    f"An image array must have 2 (H, W), 3 (H, W, C or C, H, W) or 4 (batch) dimensions, "
                    f"got {_describe(item)}."
                )
        elif isinstance(item, (list, tuple)):
            for sub in item:
                visit(sub)
        else:
            raise ValueError(
                f"Images must be PIL images, numpy arrays, torch tensors or image sources (a path, URL or base64 "
                f"text), or (nested) lists of them; got {_describe(item)}."
            )

    visit(images)
    if not flat:
        raise ValueError("No images were given (an empty list).")
    return flat


def _check_size(height: int, width: int, max_image_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"Image has zero size (height={height}, width={width}).")
    if max_image_pixels and height * width > max_image_pixels:
        raise ValueError(
            f"Image of {height}x{width} = {height * width} pixels exceeds max_image_pixels={max_image_pixels} "
            f"(a guard against decompression bombs); raise `max_image_pixels` (0 disables it) to process it."
        )


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) on the 0..255 scale -> (H, W, 3), alpha-blended over white."""
    if rgba.dtype == np.uint8:  # PIL's integer compositing, so arrays and PIL images give identical pixels
        image = Image.fromarray(rgba)
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, image).convert("RGB"))
    alpha = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.float32)


def _channels_last(array: np.ndarray, input_data_format: Any) -> np.ndarray:
    if array.ndim == 2:
        return array[..., None]
    if input_data_format is not None:
        first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
    else:
        first_ok, last_ok = array.shape[0] in _CHANNEL_COUNTS, array.shape[-1] in _CHANNEL_COUNTS
        if first_ok and last_ok:
            # Ambiguous, e.g. a 1x1 RGB image (1, 1, 3): 3 channels beat 4 beat 1; a tie reads channels-last.
            rank = {3: 0, 4: 1, 1: 2}
            first = rank[array.shape[0]] < rank[array.shape[-1]]
        elif first_ok or last_ok:
            first = first_ok
        else:
            raise ValueError(
                f"Cannot find the channel axis of an image of shape {tuple(array.shape)}: expected 1, 3 or 4 "
                f"channels first or last."
            )
    return np.moveaxis(array, 0, -1) if first else array


def _array_to_rgb(array: np.ndarray, input_data_format: Any, max_image_pixels: int, convert_rgb: bool) -> np.ndarray:
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ValueError(f"Image arrays must hold integers (0..255) or floats ([0, 1]), got dtype {array.dtype}.")
    array = _channels_last(array, input_data_format)
    height, width, channels = array.shape
    _check_size(height, width, max_image_pixels)
    if channels not in _CHANNEL_COUNTS:
        raise ValueError(f"Images must have 1, 3 or 4 channels, got {channels} (shape {tuple(array.shape)}).")
    if channels != 3 and not convert_rgb:
        raise ValueError(f"do_convert_rgb=False needs 3-channel RGB images, got {channels} channel(s).")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("Image array contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Float image arrays must hold values in [0, 1], got values in [{low}, {high}]; "
                f"pass uint8 arrays for 0..255 data."
            )
        array = array.astype(np.float32) * 255.0
    else:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"Integer image arrays must hold values in 0..255, got values in [{low}, {high}].")
        array = array.astype(np.uint8)
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        return _composite_on_white(array)
    return array


def to_rgb_array(
    image: Any, input_data_format: Any = None, max_image_pixels: int = 0, convert_rgb: bool = True
) -> np.ndarray:
    """Convert one image (or image source) to an `(H, W, 3)` array: uint8, or float32 on the 0..255 scale for float
    inputs.

    Raises:
        ValueError: for zero-size or too large images, wrong channel counts, out-of-range or non-finite values,
            unreadable image sources.
    """
    if is_image_source(image):
        image = open_image(image, max_image_pixels)
    if isinstance(image, Image.Image):
        width, height = image.size  # known before the pixels are decoded
        _check_size(height, width, max_image_pixels)
        if image.mode in _WIDE_PIL_MODES:
            return _array_to_rgb(np.asarray(image), None, max_image_pixels, convert_rgb)
        # Alpha bands or a transparent colour (palette or tRNS), as transformers' `convert_to_rgb` decides.
        transparent = bool({"A", "a"} & set(image.getbands())) or image.info.get("transparency") is not None
        if image.mode == "RGB" and not (transparent and convert_rgb):
            return np.asarray(image)
        if not convert_rgb:
            raise ValueError(f"do_convert_rgb=False needs RGB images, got a PIL image of mode {image.mode!r}.")
        if transparent:
            return _composite_on_white(np.asarray(image.convert("RGBA")))
        return np.asarray(image.convert("RGB"))
    if _is_array(image):
        if is_torch_tensor(image):
            image = image.detach().cpu()
            image = (image.float() if image.is_floating_point() else image).numpy()  # numpy has no bfloat16
        return _array_to_rgb(image, input_data_format, max_image_pixels, convert_rgb)
    raise ValueError(f"Expected a PIL image, a numpy array or a torch tensor, got {_describe(image)}.")


def _resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize an (H, W, 3) image with PIL: in uint8 for uint8 images, per channel in float32 ("F") otherwise."""
    if image.shape[:2] == (height, width):
        return image
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)).resize((width, height), resample)
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


# ---------------------------------------------------------------------------------------------------------------------


class Llama4XImageProcessor(PilBackend):
    r"""
    Llama 4's image processor on PIL and numpy (no torchvision): RGB conversion, best-fit tiling into up to
    `max_patches` tiles of `size` pixels plus a global thumbnail, rescale and normalise. See the module docstring.

    Args:
        size (`dict` or `int`, defaults to `{"height": 336, "width": 336}`): the (square) tile size.
        max_patches (`int`, defaults to 16): the largest number of tiles, thumbnail not counted.
        resize_to_max_canvas (`bool`, defaults to False): see `plan_tiling`.
        resample (defaults to bilinear), do_rescale / rescale_factor (1/255), do_normalize / image_mean /
            image_std (0.5 per channel), do_convert_rgb (defaults to True; False requires RGB inputs).
        max_image_pixels (`int`, defaults to 64 * 2**20): larger images raise `ValueError` (0 disables).

    Returns (from `__call__`): a `BatchFeature` with `pixel_values` `(total_tiles, 3, size, size)` float32 (each
    image's tiles in row-major order, then its thumbnail if it has more than one tile; images in input order) and
    `aspect_ratios` `(num_images, 2)` int64, the tile grid `(rows, cols)` of each image.

    The tile grids and resized sizes follow the rules of transformers' torchvision-based `Llama4ImageProcessor`
    (computed exactly here; its float arithmetic can land one pixel lower when the exact size is an integer). Pixel
    values differ in the resampling kernel (PIL's antialiased bilinear vs torchvision's) and in precision (float32
    here; it rescales and normalises in bfloat16).
    """

    valid_kwargs = Llama4XImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 336, "width": 336}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_patches = 16
    resize_to_max_canvas = False
    max_image_pixels = 64 * 2**20

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._check_tiling_kwargs(self.size, self.max_patches, self.max_image_pixels, self.do_resize)
        if self.do_normalize:
            self._check_normalization(self.image_mean, self.image_std)

    @staticmethod
    def _check_tiling_kwargs(size: Any, max_patches: Any, max_image_pixels: Any, do_resize: Any) -> None:
        height, width = size.get("height"), size.get("width")
        if height is None or height != width or not isinstance(height, int) or height < 1:
            raise ValueError(f"Invalid `size`={dict(size)!r}: expected a square tile {{'height': n, 'width': n}}.")
        if not isinstance(max_patches, int) or isinstance(max_patches, bool) or max_patches < 1:
            raise ValueError(f"Invalid `max_patches`={max_patches!r}: expected an int >= 1.")
        if not isinstance(max_image_pixels, int) or max_image_pixels < 0:
            raise ValueError(f"Invalid `max_image_pixels`={max_image_pixels!r}: expected an int >= 0 (0: no limit).")
        if not do_resize:
            raise ValueError("Invalid `do_resize`=False: tiling always resizes images to their best-fit canvas.")

    @staticmethod
    def _check_normalization(image_mean: Any, image_std: Any) -> None:
        """`image_mean` and `image_std`: one value or one per RGB channel, finite; every std > 0."""
        for name, value in (("image_mean", image_mean), ("image_std", image_std)):
            try:
                values = np.atleast_1d(np.asarray(value, dtype=np.float64))
            except (TypeError, ValueError):  # not numbers, or ragged
                values = np.array([np.nan])
            if values.ndim != 1 or len(values) not in (1, 3) or not np.isfinite(values).all():
                raise ValueError(f"Invalid `{name}`={value!r}: expected one finite number or one per RGB channel (3).")
        if not (np.asarray(image_std, dtype=np.float64) > 0).all():
            raise ValueError(f"Invalid `image_std`={image_std!r}: every standard deviation must be > 0 (it divides).")

    def _validate_preprocess_kwargs(self, **kwargs) -> None:
        super()._validate_preprocess_kwargs(**kwargs)
        self._check_tiling_kwargs(
            kwargs["size"], kwargs.get("max_patches"), kwargs.get("max_image_pixels"), kwargs.get("do_resize")
        )
        if kwargs.get("do_normalize"):
            self._check_normalization(kwargs.get("image_mean"), kwargs.get("image_std"))

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[Any]:
        # Our own flattening: clear errors for non-images; image sources are opened one at a time, when converted.
        return flatten_images(images)

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: Any = None,
        max_image_pixels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One raw image -> `(H, W, 3)` array (uint8, or float32 on the 0..255 scale)."""
        return to_rgb_array(
            image,
            input_data_format=input_data_format,
            max_image_pixels=self.max_image_pixels if max_image_pixels is None else max_image_pixels,
            convert_rgb=self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb,
        )

    def _rescale_normalize(self, image: np.ndarray, scale: float, do_normalize, mean, std) -> np.ndarray:
        pixels = image.astype(np.float32) * np.float32(scale)
        if do_normalize:
            mean = np.broadcast_to(np.asarray(mean, dtype=np.float32), (3,))
            std = np.broadcast_to(np.asarray(std, dtype=np.float32), (3,))
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, H, W)

    def _preprocess(
        self,
        images: list[np.ndarray],
        size,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        max_patches: int,
        resize_to_max_canvas: bool,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        tile = size.height
        resample = PILImageResampling.BILINEAR if resample is None else resample
        tiles, grids = [], []
        for image in images:  # (H, W, 3): uint8, or float32 on the 0..255 scale for float inputs
            # do_rescale=False keeps an image's own scale, as transformers does: 0..255 for integers, [0, 1] for floats
            scale = rescale_factor if do_rescale else (1.0 if image.dtype == np.uint8 else 1 / 255)
            plan = plan_tiling(image.shape[0], image.shape[1], tile, max_patches, resize_to_max_canvas)
            resized = _resize(image, *plan.resized, resample)
            canvas_h, canvas_w = plan.canvas
            canvas = np.zeros((canvas_h, canvas_w, 3), dtype=resized.dtype)  # black padding, right and bottom
            canvas[: resized.shape[0], : resized.shape[1]] = resized
            canvas = self._rescale_normalize(canvas, scale, do_normalize, image_mean, image_std)
            rows, cols = plan.grid
            # (3, rows*t, cols*t) -> (rows*cols, 3, t, t), row-major over the grid
            tiles.append(canvas.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(-1, 3, tile, tile))
            if rows * cols > 1:
                thumbnail = _resize(image, tile, tile, resample)
                thumbnail = self._rescale_normalize(thumbnail, scale, do_normalize, image_mean, image_std)
                tiles.append(thumbnail[None])
            grids.append(plan.grid)
        data = {
            "pixel_values": np.concatenate(tiles, axis=0).astype(np.float32, copy=False),
            "aspect_ratios": np.asarray(grids, dtype=np.int64).reshape(-1, 2),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)


# ---------------------------------------------------------------------------------------------------------------------


class Llama4XProcessor(ProcessorMixin):
    r"""
    Tokenizer + `Llama4XImageProcessor`; expands each `fake_image_token` of the text into Llama 4's image-token
    layout (see the module docstring) and tokenizes.

    Args:
        image_processor (`Llama4XImageProcessor`), tokenizer (any tokenizer that has the tokens below as single
            tokens, e.g. `llama4x.tokenization.train_tokenizer(...)` or Llama 4's own `tokenizer.json`).
        patch_size (`int`, defaults to 14): the vision encoder's patch size; must divide the tile size.
        pixel_shuffle_ratio (`float`, defaults to 0.5): the encoder's pixel-shuffle ratio; `1 / ratio` must be an
            integer dividing `tile_size // patch_size`. Each tile becomes
            `tokens_per_tile = ((tile_size // patch_size) * pixel_shuffle_ratio) ** 2` `<|patch|>` tokens.
        fake_image_token: the placeholder users write in the text (`<|image|>`); image_token: the marker before the
            global thumbnail in the expansion (`<|image|>`); start_of_image_token, end_of_image_token, patch_token,
            tile_x_separator_token, tile_y_separator_token: Llama 4's names.
        chat_template: defaults to `llama4x.tokenization.CHAT_TEMPLATE`.

    `__call__(images=None, text=None, **kwargs)` returns a `BatchFeature` with the tokenizer's outputs
    (`input_ids`, `attention_mask`) and, when images are given, `pixel_values` `(total_tiles, 3, size, size)`.
    Images are a flat list (matched to the placeholders in reading order across the batch) or one list per text.
    Text kwargs (`padding`, `padding_side`, `return_tensors`, ...) go to the tokenizer, image kwargs
    (`max_patches`, ...) to the image processor.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size: int = 14,
        pixel_shuffle_ratio: float = 0.5,
        fake_image_token: str = "<|image|>",
        image_token: str = "<|image|>",
        start_of_image_token: str = "<|image_start|>",
        end_of_image_token: str = "<|image_end|>",
        patch_token: str = "<|patch|>",
        tile_x_separator_token: str = "<|tile_x_separator|>",
        tile_y_separator_token: str = "<|tile_y_separator|>",
        chat_template: str | None = CHAT_TEMPLATE,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"Invalid `patch_size`={patch_size!r}: expected an int >= 1.")
        if not 0 < pixel_shuffle_ratio <= 1 or abs(1 / pixel_shuffle_ratio - round(1 / pixel_shuffle_ratio)) > 1e-9:
            raise ValueError(
                f"Invalid `pixel_shuffle_ratio`={pixel_shuffle_ratio!r}: expected 1/k for an integer k >= 1."
            )
        self.patch_size = patch_size
        self.pixel_shuffle_ratio = pixel_shuffle_ratio
        self.fake_image_token = fake_image_token
        self.image_token = image_token
        self.start_of_image_token = start_of_image_token
        self.end_of_image_token = end_of_image_token
        self.patch_token = patch_token
        self.tile_x_separator_token = tile_x_separator_token
        self.tile_y_separator_token = tile_y_separator_token
        ids = special_token_ids(
            tokenizer,
            [fake_image_token, image_token, start_of_image_token, end_of_image_token, patch_token]
            + [tile_x_separator_token, tile_y_separator_token],
        )
        self.image_token_id = ids[image_token]
        self.patch_token_id = ids[patch_token]
        self.get_tokens_per_tile(image_processor.size["height"])  # fail now if patch / shuffle / tile disagree

    def get_tokens_per_tile(self, tile_size: int) -> int:
        """`<|patch|>` tokens per tile of `tile_size` pixels: `((tile_size // patch_size) * pixel_shuffle_ratio)^2`."""
        side, shuffle = tile_size // self.patch_size, round(1 / self.pixel_shuffle_ratio)
        if tile_size % self.patch_size or side % shuffle:
            raise ValueError(
                f"Tile size {tile_size} does not fit patch_size={self.patch_size} and pixel_shuffle_ratio="
                f"{self.pixel_shuffle_ratio}: the tile must be a multiple of patch_size, and tile_size // patch_size "
                f"({side}) a multiple of 1 / pixel_shuffle_ratio ({shuffle})."
            )
        return (side // shuffle) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens per tile at the image processor's tile size."""
        return self.get_tokens_per_tile(self.image_processor.size["height"])

    def image_token_string(self, grid: Sequence[int], tokens_per_tile: int | None = None) -> str:
        """The text that replaces one placeholder for an image with tile grid `(rows, cols)` (Llama 4's layout)."""
        rows, cols = int(grid[0]), int(grid[1])
        patches = self.patch_token * (self.tokens_per_tile if tokens_per_tile is None else tokens_per_tile)
        parts = [self.start_of_image_token]
        if rows * cols > 1:
            for _ in range(rows):
                parts.append(self.tile_x_separator_token.join([patches] * cols))
                parts.append(self.tile_y_separator_token)
        parts += [self.image_token, patches, self.end_of_image_token]
        return "".join(parts)

    def _match_images(self, images: Any, counts: list[int]) -> list[Any]:
        """Flatten `images`, checking they match the placeholders: per text when given as one list per text."""
        nested = (
            isinstance(images, (list, tuple))
            and len(images) > 0
            and all(isinstance(sample, (list, tuple)) for sample in images)
        )
        if nested and len(images) != len(counts) and not _no_images(images):
            raise ValueError(
                f"Got {len(images)} list(s) of images for {len(counts)} text(s): give one list per text (empty for a "
                f"text without images), or one flat list matched to the placeholders in reading order."
            )
        if nested:
            flat = []
            for index, (sample, count) in enumerate(zip(images, counts)):
                sample_images = [] if _no_images(sample) else flatten_images(sample)
                if len(sample_images) != count:
                    raise ValueError(
                        f"Text {index} has {count} {self.fake_image_token} placeholder(s) but {len(sample_images)} "
                        f"image(s) were given for it."
                    )
                flat.extend(sample_images)
            return flat
        flat = [] if _no_images(images) else flatten_images(images)
        if len(flat) != sum(counts):
            raise ValueError(
                f"The text has {sum(counts)} {self.fake_image_token} placeholder(s) but {len(flat)} image(s) were "
                f"given."
            )
        return flat

    def _check_images_kept(self, texts: list[str], input_ids: list[list[int]]) -> None:
        """Truncation keeps every image whole: the model needs all of an image's `<|patch|>` tokens. Truncation cuts
        from one side, so an image is whole when no `start_of_image_token` and no `end_of_image_token` was cut."""
        for token in (self.start_of_image_token, self.end_of_image_token):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            expected = [text.count(token) for text in texts]
            kept = [list(ids).count(token_id) for ids in input_ids]
            if kept != expected:
                raise ValueError(
                    f"Truncation cut into an image: the texts hold {expected} {token} per text but `input_ids` "
                    f"keeps {kept}; disable `truncation` or raise `max_length`."
                )

    def _expand(self, text: str, replacements) -> tuple[str, list[dict[str, Any]]]:
        """Replace each placeholder of `text` by the next replacement, in one pass (the expansion itself contains
        `image_token`, which must not be expanded again). Also returns transformers' replacement-offset records."""
        pieces, offsets, last, gained = [], [], 0, 0
        start = text.find(self.fake_image_token)
        while start != -1:
            end = start + len(self.fake_image_token)
            replacement = next(replacements)
            pieces += [text[last:start], replacement]
            new_start = start + gained
            offsets.append(
                {
                    "type": "image",
                    "span": (start, end),
                    "new_span": (new_start, new_start + len(replacement)),
                    "text": self.fake_image_token,
                    "replacement": replacement,
                }
            )
            gained += len(replacement) - (end - start)
            last = end
            start = text.find(self.fake_image_token, end)
        pieces.append(text[last:])
        return "".join(pieces), offsets

    def __call__(
        self, images: Any = None, text: str | list[str] | None = None, videos=None, audio=None, **kwargs
    ) -> BatchFeature:
        if videos is not None or audio is not None:
            raise ValueError("Llama4XProcessor handles text and images only; got videos or audio.")
        if images is None and text is None:
            raise ValueError("Llama4XProcessor needs `text`, `images` or both.")
        merged = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None) or images_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        # Processor-level flags: top-level in transformers 5.24, text kwargs in 5.17.
        flags = {
            key: bool(text_kwargs.pop(key, None) or merged.get(key))
            for key in ("return_text_replacement_offsets", "return_mm_token_type_ids", "sanitize_control_tokens")
        }
        if flags["return_mm_token_type_ids"] or flags["sanitize_control_tokens"]:
            raise ValueError(
                "Llama4XProcessor does not support `return_mm_token_type_ids` or `sanitize_control_tokens`."
            )

        if text is None:
            return BatchFeature(dict(self.image_processor(flatten_images(images), **images_kwargs)), return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(sample, str) for sample in texts):
            raise ValueError(f"`text` must be a str or a list of str, got {_describe(text)}.")
        if not texts:  # the tokenizer fails on an empty batch with an IndexError
            raise ValueError("`text` is an empty list: expected a str or a non-empty list of str.")
        counts = [sample.count(self.fake_image_token) for sample in texts]

        data: dict[str, Any] = {}
        offsets: list[list[dict[str, Any]]] = [[] for _ in texts]
        if images is None:
            if sum(counts):
                raise ValueError(
                    f"The text has {sum(counts)} {self.fake_image_token} placeholder(s) but 0 images were given."
                )
        else:
            images = self._match_images(images, counts)
        if images:  # an empty (nested) list means text only
            image_inputs = self.image_processor(images, **images_kwargs)
            tokens_per_tile = self.get_tokens_per_tile(int(image_inputs["pixel_values"].shape[-1]))
            replacements = iter(
                self.image_token_string(grid, tokens_per_tile) for grid in image_inputs["aspect_ratios"]
            )
            texts, offsets = map(list, zip(*(self._expand(sample, replacements) for sample in texts)))
            data["pixel_values"] = image_inputs["pixel_values"]

        data = {**self.tokenizer(texts, **text_kwargs), **data}
        if images:
            self._check_images_kept(texts, data["input_ids"])
        if flags["return_text_replacement_offsets"]:
            # Lets transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` map the template's
            # character spans onto the expanded text.
            data["text_replacement_offsets"] = offsets
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + ["pixel_values"]))


def _no_images(images: Any) -> bool:
    """True for an empty list, or lists of empty lists: one empty list per text means no images at all."""
    return isinstance(images, (list, tuple)) and all(_no_images(item) for item in images)


__all__ = ["Llama4XImageProcessor", "Llama4XProcessor", "TilingPlan", "num_tiles", "plan_tiling", "supported_grids"]
