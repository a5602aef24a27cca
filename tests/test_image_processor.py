"""Tests for Llama4XImageProcessor: Llama 4's best-fit tiling against hand computations, pixel values, input kinds,
errors, save/load.

transformers' own `Llama4ImageProcessor` needs torchvision, which this environment cannot import, so the tiling
layouts below are computed by hand from Llama 4's rules (comments show the arithmetic), not compared to it.
"""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from llama4x import Llama4XImageProcessor
from llama4x.processing_llama4x import num_tiles, plan_tiling, supported_grids

TILE = 28


def make_processor(**overrides) -> Llama4XImageProcessor:
    return Llama4XImageProcessor(**{"size": TILE, "max_patches": 4, **overrides})


def solid(height: int, width: int, color=(255, 255, 255), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (width, height), color)


def test_supported_grids_are_every_grid_within_max_patches():
    # Llama 4's find_supported_resolutions(4, 224) docstring lists these 8 canvases (in tiles).
    assert set(supported_grids(4)) == {(1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)}
    assert len(supported_grids(1)) == 1 and len(supported_grids(16)) == sum(16 // r for r in range(1, 17))


# (height, width, tile, max_patches, resize_to_max_canvas) -> (grid, resized). Scale of grid (r, c) on an h x w
# image: min(r*t/h, c*t/w); pick the smallest scale >= 1 (largest with max canvas), else the largest; ties -> smallest
# grid. Resize bound: min(max(side, t), canvas side) (canvas side with max canvas); keep the aspect ratio, floor.
LAYOUTS = [
    # 1:1 small, 10x10: every grid upscales, smallest scale 2.8 on (1,1), (1,2), ..., smallest grid (1,1);
    # bound (28, 28) -> 28x28.
    pytest.param(10, 10, 28, 4, False, (1, 1), (28, 28), id="square-small"),
    # Same with resize_to_max_canvas: largest scale 5.6 on (2,2); bound = canvas 56x56.
    pytest.param(10, 10, 28, 4, True, (2, 2), (56, 56), id="square-small-max-canvas"),
    # 40x40: only (2,2) upscales (1.4); bound min(max(40,28),56) = 40 -> no resize, padded to 56x56.
    pytest.param(40, 40, 28, 4, False, (2, 2), (40, 40), id="square-medium"),
    pytest.param(40, 40, 28, 4, True, (2, 2), (56, 56), id="square-medium-max-canvas"),
    # 2:1 exactly, 100x200: all downscale; max scale 0.28 on (1,2),(2,2),(1,3),(1,4) -> (1,2);
    # bound (28, 56); scales equal -> h = 28, w = 200*28//100 = 56.
    pytest.param(100, 200, 28, 4, False, (1, 2), (28, 56), id="2:1"),
    # 50x120 (2.4:1): max scale 0.56 on (1,3),(1,4) -> (1,3); bound (28, 84); 84/120=0.7 > 28/50=0.56 ->
    # h = 28, w = 120*28//50 = 67 (then 17 columns of padding).
    pytest.param(50, 120, 28, 4, False, (1, 3), (28, 67), id="2.4:1"),
    # 1:3, 90x30: max scale 0.933 on (3,1),(4,1) -> (3,1); bound (84, 28); equal scales -> 84 x 30*84//90 = 28.
    pytest.param(90, 30, 28, 4, False, (3, 1), (84, 28), id="1:3"),
    # Same image with max_patches=2: best is (2,1) at 0.622; bound (56, 28); 28/30 > 56/90 -> h = 56,
    # w = 30*56//90 = 18.
    pytest.param(90, 30, 28, 2, False, (2, 1), (56, 18), id="1:3-max2"),
    # get_best_fit's docstring example: 200x300 on 224-pixel tiles, canvases (1,1),(1,2),(1,3),(2,1),(3,1) (= max 3):
    # upscaling 1.12 on (1,2),(1,3) -> (1,2); bound (224, 300) -> 300/300 < 224/200 -> w = 300, h = 200.
    pytest.param(200, 300, 224, 3, False, (1, 2), (200, 300), id="llama4-docstring"),
    # Huge 3000x4000 on Llama 4's defaults (336, 16): min(0.112 r, 0.084 c) peaks at 0.336 on (3,4),(3,5),(4,4)
    # -> (3,4) = 12 tiles; bound (1008, 1344) -> exact fit 1008x1344.
    pytest.param(3000, 4000, 336, 16, False, (3, 4), (1008, 1344), id="huge-defaults"),
    # Same image, one tile: (1,1), bound (336, 336); 336/4000 < 336/3000 -> w = 336, h = 3000*336//4000 = 252.
    pytest.param(3000, 4000, 336, 1, False, (1, 1), (252, 336), id="huge-one-tile"),
    # Tiny 1x1: every grid upscales (28x), smallest grid (1,1); bound (28, 28).
    pytest.param(1, 1, 28, 4, False, (1, 1), (28, 28), id="tiny-1x1"),
    # 1x1000 line: scale 0.028 c -> (1,4); bound (28, 112); 112/1000 < 28 -> w = 112, h = max(1*112//1000, 1) = 1.
    pytest.param(1, 1000, 28, 4, False, (1, 4), (1, 112), id="line-1x1000"),
    # 56x56 = exactly 2x2 tiles: (2,2) scale 1.0 is the only one >= 1; no resize.
    pytest.param(56, 56, 28, 4, False, (2, 2), (56, 56), id="exact-2x2"),
    # 1200x1600 on Llama 4's 336 tiles, at most 4: (2,2) at 0.42; bound (672, 672); 672/1600 < 672/1200 -> w = 672,
    # h = floor(1200 * 0.42) in float32 (as transformers computes it, seen on its processor) = floor(503.99998) = 503.
    pytest.param(1200, 1600, 336, 4, False, (2, 2), (503, 672), id="float32-rounding"),
]


@pytest.mark.parametrize("height, width, tile, max_patches, max_canvas, grid, resized", LAYOUTS)
def test_plan_tiling_matches_hand_computed_layout(height, width, tile, max_patches, max_canvas, grid, resized):
    plan = plan_tiling(height, width, tile, max_patches, resize_to_max_canvas=max_canvas)
    assert (plan.grid, plan.resized) == (grid, resized)
    assert plan.canvas == (grid[0] * tile, grid[1] * tile)
    assert plan.num_tiles == grid[0] * grid[1] + (grid[0] * grid[1] > 1)


@pytest.mark.parametrize(
    "height, width, max_patches, max_canvas, grid, resized",
    [p.values[:2] + p.values[3:] for p in LAYOUTS if p.values[2] == TILE and p.values[0] * p.values[1] < 10**5],
)
def test_processor_output_follows_the_layout(height, width, max_patches, max_canvas, grid, resized):
    processor = make_processor(max_patches=max_patches, resize_to_max_canvas=max_canvas)
    out = processor(solid(height, width))  # white: 1.0 after normalisation; padding is black: -1.0
    pixels = out["pixel_values"]
    assert out["aspect_ratios"].tolist() == [list(grid)]
    assert pixels.shape == (num_tiles(grid), 3, TILE, TILE) and pixels.dtype == np.float32
    rows, cols = grid
    canvas = pixels[: rows * cols].reshape(rows, cols, 3, TILE, TILE).transpose(2, 0, 3, 1, 4)
    canvas = canvas.reshape(3, rows * TILE, cols * TILE)
    content = np.zeros(canvas.shape[1:], dtype=bool)
    content[: resized[0], : resized[1]] = True
    np.testing.assert_array_equal(canvas[:, content], 1.0)
    np.testing.assert_array_equal(canvas[:, ~content], -1.0)
    if rows * cols > 1:
        np.testing.assert_array_equal(pixels[-1], 1.0)  # the global thumbnail covers the whole tile


def transformers_sizing(height: int, width: int, tile: int, max_patches: int, max_canvas: bool):
    """transformers' Llama 4 sizing (get_best_fit, then get_max_res_without_distortion) recomputed with its operand
    types: canvases are int64 tensors, image sides Python ints, bounds `min(int, tensor)`. Its module imports
    torchvision, which this machine lacks, hence the recomputation."""
    canvases = torch.tensor([(rows * tile, cols * tile) for rows, cols in supported_grids(max_patches)])
    scales = torch.where(
        canvases[:, 0] / height > canvases[:, 1] / width, canvases[:, 1] / width, canvases[:, 0] / height
    )
    upscaling = scales[scales >= 1]
    if len(upscaling):
        chosen = upscaling.max() if max_canvas else upscaling.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    canvas = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]
    bound_h, bound_w = canvas if max_canvas else (min(max(height, tile), canvas[0]), min(max(width, tile), canvas[1]))
    scale_h, scale_w = bound_h / height, bound_w / width
    if scale_w < scale_h:
        resized = (min(math.floor(height * scale_w), bound_h), bound_w)
    else:
        resized = (bound_h, min(math.floor(width * scale_h), bound_w))
    grid = (int(canvas[0]) // tile, int(canvas[1]) // tile)
    return grid, (max(int(resized[0]), 1), max(int(resized[1]), 1))


@settings(max_examples=400, deadline=None)
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    tile=st.sampled_from([14, 28, 336]),
    max_patches=st.integers(1, 16),
    max_canvas=st.booleans(),
)
def test_sizing_rounds_as_transformers_llama4(height, width, tile, max_patches, max_canvas):
    plan = plan_tiling(height, width, tile, max_patches, resize_to_max_canvas=max_canvas)
    assert (plan.grid, plan.resized) == transformers_sizing(height, width, tile, max_patches, max_canvas)


def test_sizing_agrees_with_transformers_on_every_side_up_to_2048_for_defaults():
    """Square-tile defaults (336, 16 tiles), every height for a sweep of widths: the rounding boundaries are dense."""
    for width in (1, 335, 336, 337, 500, 1000, 1600, 2047, 2048):
        for height in range(1, 2049):
            plan = plan_tiling(height, width, 336, 16)
            assert (plan.grid, plan.resized) == transformers_sizing(height, width, 336, 16, False), (height, width)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 2048),
    width=st.integers(1, 2048),
    mode=st.sampled_from(["RGB", "RGBA", "L"]),
    max_patches=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_any_image_gives_the_documented_layout_and_finite_values(height, width, mode, max_patches, seed):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
    out = make_processor(max_patches=max_patches)(image)
    plan = plan_tiling(height, width, TILE, max_patches)
    rows, cols = plan.grid
    assert out["aspect_ratios"].tolist() == [[rows, cols]] and rows * cols <= max_patches
    values = out["pixel_values"]
    assert values.shape == (num_tiles(plan.grid), 3, TILE, TILE) and values.dtype == np.float32
    assert np.isfinite(values).all() and values.min() >= -1.0 and values.max() <= 1.0
    canvas = values[: rows * cols].reshape(rows, cols, 3, TILE, TILE).transpose(2, 0, 3, 1, 4)
    canvas = canvas.reshape(3, rows * TILE, cols * TILE)
    padding = np.ones(canvas.shape[1:], dtype=bool)
    padding[: plan.resized[0], : plan.resized[1]] = False
    assert (canvas[:, padding] == -1.0).all(), "padding right and bottom is black"


def test_tiles_are_row_major_and_thumbnail_is_last():
    colors = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 0)}
    image = np.zeros((2 * TILE, 2 * TILE, 3), dtype=np.uint8)
    for (r, c), color in colors.items():
        image[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = color
    pixels = make_processor()(image)["pixel_values"]  # 56x56 -> exactly 2x2 tiles, no resampling
    assert pixels.shape == (5, 3, TILE, TILE)
    for index, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = np.asarray(colors[(r, c)], dtype=np.float32) / 255 * 2 - 1
        np.testing.assert_array_equal(pixels[index], np.broadcast_to(expected[:, None, None], (3, TILE, TILE)))
    thumbnail = np.asarray(Image.fromarray(image).resize((TILE, TILE), Image.BILINEAR), dtype=np.float32)
    np.testing.assert_allclose(pixels[4], (thumbnail / 255 * 2 - 1).transpose(2, 0, 1), atol=1e-6)


def test_rescale_and_normalize_follow_the_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(TILE, TILE, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    pixels = make_processor(image_mean=mean, image_std=std)(image)["pixel_values"]  # one tile, no resize
    expected = (image.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(pixels[0], expected.transpose(2, 0, 1), atol=1e-6)
    default = make_processor()(image)["pixel_values"]
    assert default.dtype == np.float32 and default.min() >= -1.0 and default.max() <= 1.0
    extremes = make_processor()([np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)])["pixel_values"]
    assert extremes[0].max() == -1.0 and extremes[1].min() == 1.0


def test_do_rescale_false_keeps_the_inputs_own_scale():
    """transformers' idiom for images already in [0, 1]: `do_rescale=False` normalises the values as given."""
    rng = np.random.default_rng(5)
    unit = rng.random((TILE, TILE, 3))  # one tile, no resize
    integers = rng.integers(0, 256, size=(TILE, TILE, 3), dtype=np.uint8)
    for image, values in ((unit.astype(np.float32), unit), (integers, integers.astype(np.float64))):
        pixels = make_processor(max_patches=1)(image, do_rescale=False)["pixel_values"]
        expected = ((values - 0.5) / 0.5).transpose(2, 0, 1)
        diff = np.abs(pixels[0] - expected).max()
        assert diff < 1e-4, f"{image.dtype}: max diff {diff}"


def test_return_tensors_pt_and_batches_keep_input_order():
    images = [solid(10, 10), solid(100, 200), solid(90, 30, (0, 0, 0))]
    out = make_processor()(images, return_tensors="pt")
    assert out["pixel_values"].dtype == torch.float32 and out["aspect_ratios"].dtype == torch.int64
    assert out["aspect_ratios"].tolist() == [[1, 1], [1, 2], [3, 1]]
    assert out["pixel_values"].shape == (1 + 3 + 4, 3, TILE, TILE)
    assert (out["pixel_values"][4:] == -1).all()  # the black image's tiles
    nested = make_processor()([[images[0]], [images[1], images[2]]])
    np.testing.assert_array_equal(nested["pixel_values"], out["pixel_values"].numpy())


# ---------------------------------------------------------------------------------------------------------------------
# Input kinds: all reduce to the same RGB pixels.


def rgb_pixels(image, **kwargs) -> np.ndarray:
    return make_processor(**kwargs)(image)["pixel_values"]


def test_numpy_hwc_chw_torch_and_pil_agree():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, size=(30, 45, 3), dtype=np.uint8)
    reference = rgb_pixels(Image.fromarray(hwc))
    np.testing.assert_array_equal(rgb_pixels(hwc), reference)
    np.testing.assert_array_equal(rgb_pixels(hwc.transpose(2, 0, 1)), reference)
    np.testing.assert_array_equal(rgb_pixels(torch.from_numpy(hwc)), reference)
    np.testing.assert_array_equal(rgb_pixels(hwc.astype(np.int64)), reference)
    np.testing.assert_array_equal(rgb_pixels(hwc[None]), reference)  # a (1, H, W, C) batch
    # Float arrays in [0, 1]: resized in float32 instead of uint8, so equal up to uint8 rounding of the resize.
    np.testing.assert_allclose(rgb_pixels(hwc.astype(np.float32) / 255), reference, atol=2 / 255 * 2)


def test_float_arrays_without_resize_match_uint8_exactly():
    hwc = np.random.default_rng(2).integers(0, 256, size=(TILE, TILE, 3), dtype=np.uint8)
    np.testing.assert_allclose(rgb_pixels(hwc.astype(np.float64) / 255), rgb_pixels(hwc), atol=1e-6)


def test_one_pixel_rgb_array_is_read_channels_last():
    pixels = rgb_pixels(np.array([[[255, 0, 51]]], dtype=np.uint8))  # (1, 1, 3): ambiguous, resolved as RGB
    np.testing.assert_allclose(pixels[0, :, 0, 0], [1.0, -1.0, -0.6], atol=1e-6)
    np.testing.assert_allclose(pixels, np.broadcast_to(pixels[:, :, :1, :1], pixels.shape))  # constant tile
    chw = rgb_pixels(np.array([[[255]], [[0]], [[51]]], dtype=np.uint8))  # (3, 1, 1): channels first
    np.testing.assert_array_equal(chw, pixels)


def test_grayscale_inputs_replicate_to_three_equal_channels():
    gray = np.random.default_rng(3).integers(0, 256, size=(20, 33), dtype=np.uint8)
    reference = rgb_pixels(Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)))
    for image in (Image.fromarray(gray), gray, gray[..., None], gray[None], torch.from_numpy(gray)):
        np.testing.assert_array_equal(rgb_pixels(image), reference)


@pytest.mark.parametrize("mode", ["P", "CMYK", "1", "YCbCr"])
def test_other_pil_modes_convert_like_pil(mode):
    rgb = Image.fromarray(np.random.default_rng(4).integers(0, 256, size=(12, 17, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    np.testing.assert_array_equal(rgb_pixels(image), rgb_pixels(image.convert("RGB")))


def test_transparency_is_composited_on_white():
    clear = solid(10, 10, (200, 10, 10, 0), mode="RGBA")
    opaque = solid(10, 10, (200, 10, 10, 255), mode="RGBA")
    half = solid(10, 10, (0, 0, 0, 128), mode="RGBA")
    assert (rgb_pixels(clear) == 1.0).all()
    np.testing.assert_array_equal(rgb_pixels(opaque), rgb_pixels(solid(10, 10, (200, 10, 10))))
    np.testing.assert_allclose(rgb_pixels(half), 2 * (127 / 255) - 1, atol=2 / 255)  # 255 * (1 - 128/255)
    np.testing.assert_array_equal(rgb_pixels(np.asarray(half)), rgb_pixels(half))  # (H, W, 4) arrays too
    np.testing.assert_array_equal(rgb_pixels(half.convert("LA")), rgb_pixels(half.convert("LA").convert("RGBA")))
    palette = solid(10, 10, (0, 0, 0)).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert (rgb_pixels(palette) == 1.0).all()
    keyed = solid(10, 10, (0, 0, 0))
    keyed.info["transparency"] = (0, 0, 0)  # an RGB PNG's tRNS colour key
    assert (rgb_pixels(keyed) == 1.0).all()
    float_rgba = np.zeros((10, 10, 4), dtype=np.float32)  # float path: transparent black -> white
    assert (rgb_pixels(float_rgba) == 1.0).all()


def test_wide_pil_modes_use_the_array_rules():
    np.testing.assert_array_equal(rgb_pixels(solid(5, 5, 200, mode="I")), rgb_pixels(solid(5, 5, (200,) * 3)))
    np.testing.assert_allclose(rgb_pixels(solid(5, 5, 0.5, mode="F")), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"0\.\.255, got values in \[1000, 1000\]"):
        rgb_pixels(solid(5, 5, 1000, mode="I"))


# ---------------------------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 5, 3), dtype=np.uint8), r"zero size \(height=0, width=5\)"),
        (Image.new("RGB", (0, 5)), r"zero size \(height=5, width=0\)"),
        (np.zeros((10, 10, 2), dtype=np.uint8), "Cannot find the channel axis"),
        (np.zeros((10, 10, 5), dtype=np.uint8), "Cannot find the channel axis"),
        (np.zeros((2, 10, 10), dtype=np.uint8), "Cannot find the channel axis"),
        (np.zeros((4, 10, 10, 3, 1), dtype=np.uint8), "2 .* 3 .* or 4 .* dimensions"),
        (np.full((5, 5, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((5, 5, 3), np.inf), "NaN or infinite"),
        (np.full((5, 5, 3), 2.0), r"\[0, 1\], got values in \[2.0, 2.0\]"),
        (np.full((5, 5, 3), 300, dtype=np.int32), r"0\.\.255, got values in \[300, 300\]"),
        (np.full((5, 5, 3), -1, dtype=np.int8), r"0\.\.255"),
        (np.zeros((5, 5, 3), dtype=bool), "dtype bool"),
        ("photo.png", "Image file photo.png does not exist"),
        (42, "got int"),
        (None, "got NoneType"),
        ({"image": 1}, "got dict"),
        ([solid(5, 5), "x"], "Image file x does not exist"),
        (b"photo", "got bytes"),
        ([], "No images"),
    ],
)
def test_invalid_images_raise_clear_value_errors(image, message):
    with pytest.raises(ValueError, match=message):
        make_processor()(image)


def test_channel_count_error_names_the_count_when_the_layout_is_explicit():
    with pytest.raises(ValueError, match=r"1, 3 or 4 channels, got 2"):
        make_processor()(np.zeros((10, 10, 2), dtype=np.uint8), input_data_format="channels_last")


def test_pixel_bound_names_size_and_bound():
    with pytest.raises(ValueError, match=r"20x30 = 600 pixels exceeds max_image_pixels=500"):
        make_processor(max_image_pixels=500)(np.zeros((20, 30, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"max_image_pixels=100"):
        make_processor()(solid(20, 30), max_image_pixels=100)  # per call
    unbounded = make_processor(max_image_pixels=0)(np.zeros((20, 30, 3), dtype=np.uint8))
    assert unbounded["aspect_ratios"].tolist() == [[1, 2]]


def test_decompression_bomb_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")  # 81 Mpx in ~10 kB
    buffer.seek(0)
    image = Image.open(buffer)  # lazy: the size is known, the pixels are not decoded yet
    with pytest.raises(ValueError, match=r"9000x9000 = 81000000 pixels exceeds max_image_pixels=67108864"):
        Llama4XImageProcessor()(image)


def test_do_convert_rgb_false_requires_rgb():
    assert make_processor(do_convert_rgb=False)(solid(5, 5))["pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match="do_convert_rgb=False needs RGB images, got a PIL image of mode 'L'"):
        make_processor(do_convert_rgb=False)(solid(5, 5, 0, mode="L"))
    with pytest.raises(ValueError, match="needs 3-channel RGB images, got 1 channel"):
        make_processor(do_convert_rgb=False)(np.zeros((5, 5), dtype=np.uint8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": {"height": 28, "width": 56}}, "square tile"),
        ({"max_patches": 0}, r"`max_patches`=0"),
        ({"max_image_pixels": -1}, r"`max_image_pixels`=-1"),
        ({"do_resize": False}, r"`do_resize`=False"),
        ({"image_std": [0.5, 0.0, 0.5]}, r"`image_std`=.0.5, 0.0, 0.5.: every standard deviation must be > 0"),
        ({"image_std": -1.0}, r"`image_std`=-1.0: every standard deviation must be > 0"),
        ({"image_mean": [0.5, 0.5]}, r"`image_mean`=.0.5, 0.5.: expected one finite number or one per RGB"),
        ({"image_mean": float("nan")}, r"`image_mean`=nan"),
    ],
)
def test_invalid_settings_raise_at_construction_and_call(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_processor(**kwargs)
    with pytest.raises(ValueError, match=message):
        make_processor()(solid(5, 5), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field", [({"image_mean": "grey"}, "image_mean"), ({"image_std": [0.5, [0.5]]}, "image_std")]
)
def test_non_numeric_normalisation_values_are_refused_naming_the_field(kwargs, field):
    # transformers >= 5.2x refuses them by type first (its own error names the field); before, llama4x's check does
    with pytest.raises(Exception, match=field):
        make_processor(**kwargs)


def test_zero_std_is_accepted_when_normalisation_is_off(tmp_path):
    pixels = make_processor()(solid(5, 5), do_normalize=False, image_std=0.0)["pixel_values"]
    assert np.isfinite(pixels).all()
    unnormalised = make_processor(do_normalize=False, image_std=0.0)  # and such a processor saves and reloads
    unnormalised.save_pretrained(tmp_path)
    assert np.isfinite(Llama4XImageProcessor.from_pretrained(tmp_path)(solid(5, 5))["pixel_values"]).all()


def test_save_and_load_round_trip(tmp_path):
    processor = make_processor(max_patches=6, resize_to_max_canvas=True, image_mean=[0.4, 0.5, 0.6])
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    for loaded in (Llama4XImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is Llama4XImageProcessor
        assert loaded.to_dict() == processor.to_dict()
        image = solid(40, 70, (10, 120, 250))
        np.testing.assert_array_equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_defaults_are_llama4s():
    processor = Llama4XImageProcessor()
    assert (processor.size["height"], processor.size["width"], processor.max_patches) == (336, 336, 16)
    assert processor.resample == Image.BILINEAR and processor.resize_to_max_canvas is False
    assert tuple(processor.image_mean) == tuple(processor.image_std) == (0.5, 0.5, 0.5)
    assert processor.rescale_factor == 1 / 255
