"""Tests for Llama4XProcessor: image-token expansion (layout, counts, parity with transformers' Llama4Processor),
placeholder/image mismatches, chat template, tokenizer.json compatibility, save/load."""

import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import AutoProcessor, Llama4Processor, PreTrainedTokenizerFast

from llama4x import Llama4XImageProcessor, Llama4XProcessor
from llama4x.data import python_docs_texts
from llama4x.processing_llama4x import num_tiles
from llama4x.tokenization import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, train_tokenizer
from tiny import run_without_llama4x

TILE, PATCH, SHUFFLE = 28, 7, 0.5
TOKENS_PER_TILE = 4  # (28 // 7) ** 2 * 0.5 ** 2


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(python_docs_texts()[:5], vocab_size=400)


def make_processor(tokenizer, tile=TILE, patch_size=PATCH, pixel_shuffle_ratio=SHUFFLE, **image_kwargs):
    image_processor = Llama4XImageProcessor(size=tile, **{"max_patches": 4, **image_kwargs})
    return Llama4XProcessor(image_processor, tokenizer, patch_size=patch_size, pixel_shuffle_ratio=pixel_shuffle_ratio)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_processor(tokenizer)


def image(height, width, color=(30, 60, 90)):
    return Image.new("RGB", (width, height), color)


def model_tokens_per_tile(image_size: int, patch_size: int, pixel_shuffle_ratio: float) -> int:
    """What the vision tower emits per tile: (image_size // patch_size)^2 patches, pixel shuffle keeps ratio^2."""
    return round((image_size // patch_size) ** 2 * pixel_shuffle_ratio**2)


P, X, Y = "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"


@pytest.mark.parametrize(
    "grid, expected",
    [
        ((1, 1), "<|image_start|><|image|>" + P * 4 + "<|image_end|>"),
        ((1, 2), "<|image_start|>" + P * 4 + X + P * 4 + Y + "<|image|>" + P * 4 + "<|image_end|>"),
        (
            (2, 3),
            "<|image_start|>" + (P * 4 + X + P * 4 + X + P * 4 + Y) * 2 + "<|image|>" + P * 4 + "<|image_end|>",
        ),
        ((3, 1), "<|image_start|>" + (P * 4 + Y) * 3 + "<|image|>" + P * 4 + "<|image_end|>"),
    ],
)
def test_image_token_string_is_llama4s_layout(processor, grid, expected):
    assert processor.image_token_string(grid) == expected


@pytest.mark.parametrize(
    "tile, patch_size, ratio", [(28, 7, 0.5), (28, 14, 1.0), (32, 4, 0.5), (28, 7, 1.0), (336, 14, 0.5)]
)
def test_patch_token_count_equals_what_the_vision_tower_emits(tokenizer, tile, patch_size, ratio):
    processor = make_processor(tokenizer, tile=tile, patch_size=patch_size, pixel_shuffle_ratio=ratio)
    per_tile = model_tokens_per_tile(tile, patch_size, ratio)
    assert processor.tokens_per_tile == per_tile
    images = [image(tile // 3, tile // 2), image(tile, 3 * tile), image(2 * tile, 2 * tile)]
    out = processor(text="a <|image|> b <|image|><|image|> c", images=images)
    ids = out["input_ids"][0]
    grids = processor.image_processor(images)["aspect_ratios"].tolist()
    assert grids == [[1, 1], [1, 3], [2, 2]]
    total_tiles = sum(r * c + (r * c > 1) for r, c in grids)
    assert out["pixel_values"].shape == (total_tiles, 3, tile, tile)
    token = processor.tokenizer.convert_tokens_to_ids
    assert ids.count(token(P)) == total_tiles * per_tile
    assert ids.count(token(X)) == sum(r * (c - 1) for r, c in grids if r * c > 1)
    assert ids.count(token(Y)) == sum(r for r, c in grids if r * c > 1)
    assert ids.count(token("<|image_start|>")) == ids.count(token("<|image_end|>")) == 3
    assert ids.count(token("<|image|>")) == 3  # one global marker per image, placeholders all replaced


def test_matches_transformers_llama4_processor(tokenizer, processor):
    """transformers' Llama4Processor (with our image processor and tokenizer) expands text to the same ids."""
    reference = Llama4Processor(
        image_processor=processor.image_processor, tokenizer=tokenizer, patch_size=PATCH, pixel_shuffle_ratio=SHUFFLE
    )
    images = [image(10, 10), image(100, 200), image(90, 30), image(40, 40)]
    text = "one <|image|> two <|image|>\n three <|image|><|image|> end"
    ours, theirs = processor(text=text, images=images), reference(text=text, images=images)
    assert ours["input_ids"] == theirs["input_ids"]
    np.testing.assert_array_equal(np.asarray(ours["pixel_values"]), np.asarray(theirs["pixel_values"]))


def test_batches_with_images_per_text_and_padding(processor):
    texts = ["<|image|> what?", "no image here", "<|image|> and <|image|>"]
    per_text = [[image(10, 10)], [], [image(100, 200), image(90, 30)]]
    out = processor(text=texts, images=per_text, padding=True, return_tensors="pt")
    flat = processor(
        text=texts, images=[im for sample in per_text for im in sample], padding=True, return_tensors="pt"
    )
    assert torch.equal(out["input_ids"], flat["input_ids"])
    assert torch.equal(out["pixel_values"], flat["pixel_values"])
    assert out["input_ids"].shape == out["attention_mask"].shape and out["input_ids"].shape[0] == 3
    assert out["pixel_values"].shape == (1 + 3 + 4, 3, TILE, TILE) and out["pixel_values"].dtype == torch.float32
    lengths = out["attention_mask"].sum(-1).tolist()
    unpadded = [processor(text=t, images=i or None)["input_ids"][0] for t, i in zip(texts, per_text)]
    assert lengths == [len(ids) for ids in unpadded]
    pad = processor.tokenizer.pad_token_id
    assert out["input_ids"][1, : -lengths[1]].eq(pad).all()  # left padding: llama4x's tokenizers generate batches


def test_text_only_and_images_only_calls(processor, tokenizer):
    assert processor(text="plain text")["input_ids"] == tokenizer(["plain text"])["input_ids"]
    assert set(processor(text=["a", "b"], images=[[], []])) == {"input_ids", "attention_mask"}  # no image per text
    out = processor(images=[image(10, 10), image(100, 200)], return_tensors="pt")
    assert set(out) == {"pixel_values", "aspect_ratios"} and out["pixel_values"].shape[0] == 4


@pytest.mark.parametrize(
    "text, images, message",
    [
        ("<|image|> <|image|>", [image(5, 5)], r"text has 2 <\|image\|> placeholder\(s\) but 1 image\(s\)"),
        ("no placeholder", [image(5, 5)], r"text has 0 <\|image\|> placeholder\(s\) but 1 image\(s\)"),
        ("<|image|>", None, r"text has 1 <\|image\|> placeholder\(s\) but 0 images"),
        (["<|image|>", "x"], [[], [image(5, 5)]], r"Text 0 has 1 <\|image\|> placeholder\(s\) but 0 image\(s\)"),
        (["<|image|>", "x"], [[image(5, 5)], [image(5, 5)]], r"Text 1 has 0 .* but 1 image\(s\)"),
        (["a", 3], None, "must be a str or a list of str"),
        ([], None, r"`text` is an empty list"),
        ([], [image(5, 5)], r"`text` is an empty list"),
        ("<|image|>", ["not an image"], "Image file not an image does not exist"),
        ("<|image|>", [3], "got int"),
    ],
)
def test_placeholder_image_mismatches_raise(processor, text, images, message):
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=images)


@pytest.mark.parametrize("nested", [[[image(5, 5), image(6, 6)]], [[image(5, 5)], [image(6, 6)], []]])
def test_one_list_per_text_needs_as_many_lists_as_texts(processor, nested):
    with pytest.raises(ValueError, match=rf"{len(nested)} list\(s\) of images for 2 text\(s\)"):
        processor(text=["a <|image|>", "b <|image|>"], images=nested)


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_into_an_image_raises(processor, side):
    text, images = "<|image|>", [image(100, 200)]
    full = processor(text=text, images=images)["input_ids"][0]  # <|begin_of_text|>, then only the image's tokens
    kwargs = {"truncation": True, "truncation_side": side}
    with pytest.raises(ValueError, match=r"Truncation cut into an image: .* or raise `max_length`"):
        processor(text=text, images=images, max_length=len(full) - 2, **kwargs)
    kept = processor(text=text, images=images, max_length=len(full), **kwargs)["input_ids"][0]
    assert kept == full


def test_videos_and_audio_are_refused(processor):
    with pytest.raises(ValueError, match="text and images only"):
        processor(text="x", videos=[np.zeros((2, 4, 4, 3))])


@pytest.mark.parametrize(
    "patch_size, ratio, message",
    [
        (5, 0.5, r"Tile size 28 does not fit patch_size=5"),
        (14, 0.25, r"tile_size // patch_size \(2\) a multiple of 1 / pixel_shuffle_ratio \(4\)"),
        (7, 0.3, r"`pixel_shuffle_ratio`=0.3"),
        (0, 0.5, r"`patch_size`=0"),
    ],
)
def test_inconsistent_patch_settings_raise(tokenizer, patch_size, ratio, message):
    with pytest.raises(ValueError, match=message):
        make_processor(tokenizer, patch_size=patch_size, pixel_shuffle_ratio=ratio)


def test_call_time_tile_size_changes_the_token_count(processor):
    out = processor(text="<|image|>", images=[image(5, 5)], size={"height": 56, "width": 56})
    assert out["pixel_values"].shape == (1, 3, 56, 56)
    assert out["input_ids"][0].count(processor.patch_token_id) == model_tokens_per_tile(56, PATCH, SHUFFLE)


# ---------------------------------------------------------------------------------------------------------------------
# Chat template.

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
    {"role": "user", "content": "And this one? "},
]


def test_chat_template_renders_llama4_turns(processor, tokenizer):
    expected = (
        "<|begin_of_text|>"
        "<|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\n<|image|>What digit is this?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n7<|eot|>"
        "<|header_start|>user<|header_end|>\n\nAnd this one? <|eot|>"
    )
    assert processor.apply_chat_template(MESSAGES) == expected
    prompt = expected + "<|header_start|>assistant<|header_end|>\n\n"
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == prompt
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == prompt
    assert processor.chat_template == tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_template_tokenizes_with_images(processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image(100, 200)}, {"type": "text", "text": "?"}]}
    ]
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    direct = processor(text=text, images=[image(100, 200)], add_special_tokens=False, return_tensors="pt")
    assert torch.equal(out["input_ids"], direct["input_ids"])
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    assert out["input_ids"][0].tolist().count(processor.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("key", ["path", "url", "image"])
def test_chat_template_opens_images_named_by_path(processor, tmp_path, key):
    path = tmp_path / "photo.png"
    image(100, 200).save(path)
    content = [{"type": "image", key: str(path)}, {"type": "text", "text": "?"}]
    out = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert np.array_equal(out["pixel_values"], processor.image_processor(image(100, 200))["pixel_values"])


def test_assistant_tokens_mask_marks_the_answer_and_eot(processor):
    messages = [{"role": "user", "content": "Which digit?"}, {"role": "assistant", "content": "7"}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    assert processor.decode([i for i, m in zip(ids, mask) if m]) == "7<|eot|>"


def test_replacement_offsets_locate_each_expansion(processor):
    text = "ab<|image|>cd<|image|>"
    out = processor(text=text, images=[image(5, 5), image(100, 200)], return_text_replacement_offsets=True)
    offsets = out["text_replacement_offsets"][0]
    expanded = processor.tokenizer.decode(out["input_ids"][0], skip_special_tokens=False)[len(BOS_TOKEN) :]
    assert [o["span"] for o in offsets] == [(2, 11), (13, 22)]
    for record in offsets:
        start, end = record["new_span"]
        assert expanded[start:end] == record["replacement"]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer compatibility and save/load.


def test_any_compatible_tokenizer_json_works(tokenizer, processor, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
    )
    other = Llama4XProcessor(processor.image_processor, loaded, patch_size=PATCH, pixel_shuffle_ratio=SHUFFLE)
    kwargs = {"text": ["<|image|> hello", "x"], "images": [image(90, 30)], "padding": True}
    assert other(**kwargs)["input_ids"] == processor(**kwargs)["input_ids"]


def test_tokenizer_without_the_image_tokens_is_refused(processor):
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "<|image|>": 2}, unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    with pytest.raises(ValueError, match=r"tokenizer has no special token '<\|image_start\|>'"):
        Llama4XProcessor(processor.image_processor, bare)


def test_save_and_load_round_trip(tokenizer, tmp_path):
    processor = make_processor(tokenizer, tile=32, patch_size=4, max_patches=6)
    processor.save_pretrained(tmp_path)
    for loaded in (AutoProcessor.from_pretrained(tmp_path), Llama4XProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is Llama4XProcessor and type(loaded.image_processor) is Llama4XImageProcessor
        assert (loaded.patch_size, loaded.pixel_shuffle_ratio, loaded.tokens_per_tile) == (4, 0.5, 16)
        assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
        assert loaded.chat_template == processor.chat_template
        assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
        kwargs = {"text": ["<|image|> hi", "<|image|>"], "images": [image(50, 120), image(3, 3)], "padding": True}
        ours, theirs = loaded(**kwargs), processor(**kwargs)
        assert ours["input_ids"] == theirs["input_ids"]
        np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])


def test_saved_folder_loads_with_trust_remote_code_without_llama4x(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_llama4x.Llama4XProcessor"
    assert (tmp_path / "processing_llama4x.py").exists() and (tmp_path / "tokenization.py").exists()
    kwargs = {"text": "a <|image|>", "images": [image(100, 50)]}
    expected = processor(**kwargs)["input_ids"]
    run_without_llama4x(
        f"""
        from PIL import Image
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        ids = processor(text="a <|image|>", images=[Image.new("RGB", (50, 100), (30, 60, 90))])["input_ids"]
        assert "llama4x" not in sys.modules
        assert ids == {expected!r}, ids
        """,
        cwd=tmp_path,
    )


def test_decode_and_batch_decode_delegate_to_the_tokenizer(processor, tokenizer):
    ids = processor(text=["<|image|> seven", "x"], images=[image(5, 5)], padding=True)["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == [" seven", "x"]
    assert processor.decode(ids[0]) == tokenizer.decode(ids[0])
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]


# ---------------------------------------------------------------------------------------------------------------------
# Properties of the placeholder expansion (hypothesis): any texts, image counts, image sizes, tile settings and
# max_patches. The expected ids are built here from Llama 4's layout, independently of `image_token_string`.

# (tile, patch_size, pixel_shuffle_ratio): 4, 4, 16 and 1 `<|patch|>` tokens per tile.
TILE_SETTINGS = [(28, 7, 0.5), (28, 14, 1.0), (32, 4, 0.5), (16, 8, 0.5)]
IMAGE_TOKENS = ("<|image|>", "<|image_start|>", "<|image_end|>", P, X, Y)
# Letters, digits, spaces, newlines, the characters of the special tokens' spelling, accents, CJK and an emoji.
TEXT_ALPHABET = "abcXYZ 019\n\t.,:;!?<|>_-é中🙂"


@pytest.fixture(scope="module")
def processors_by_tile(tokenizer):
    return {setting: make_processor(tokenizer, *setting) for setting in TILE_SETTINGS}


def text_pieces(count: int):
    """`count` + 1 pieces of text that never spell a special token (so the placeholders are the only image tokens)."""
    piece = st.text(alphabet=TEXT_ALPHABET, max_size=12).filter(lambda s: "<|" not in s and "|>" not in s)
    return st.lists(piece, min_size=count + 1, max_size=count + 1)


@st.composite
def samples(draw):
    """One text: its pieces between placeholders and its images (height, width, colour)."""
    count = draw(st.integers(0, 4))
    sizes = st.tuples(st.integers(1, 200), st.integers(1, 200), st.integers(0, 255))
    return draw(text_pieces(count)), draw(st.lists(sizes, min_size=count, max_size=count))


def expected_image_ids(token_id, grid, per_tile: int) -> list[int]:
    """Llama 4's layout: per row, tiles joined by x separators then a y separator (multi-tile only), then the
    `<|image|>` marker and the thumbnail (or single tile), inside `<|image_start|>` ... `<|image_end|>`."""
    rows, cols = grid
    patches = [token_id(P)] * per_tile
    ids = [token_id("<|image_start|>")]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                ids += patches + ([token_id(X)] if col < cols - 1 else [token_id(Y)])
    return ids + [token_id("<|image|>")] + patches + [token_id("<|image_end|>")]


def image_spans(ids: list[int], start_id: int, end_id: int) -> list[tuple[int, int]]:
    """(start, end) index pairs, end inclusive, of each `<|image_start|>` ... `<|image_end|>` run."""
    starts = [i for i, t in enumerate(ids) if t == start_id]
    ends = [i for i, t in enumerate(ids) if t == end_id]
    assert len(starts) == len(ends), f"{len(starts)} <|image_start|> but {len(ends)} <|image_end|>"
    return list(zip(starts, ends))


@settings(max_examples=50, deadline=None)
@given(
    batch=st.lists(samples(), min_size=1, max_size=2),
    tile_setting=st.sampled_from(TILE_SETTINGS),
    max_patches=st.integers(1, 6),
    nested=st.booleans(),
)
def test_expansion_properties_for_any_texts_images_and_tilings(
    processors_by_tile, tokenizer, batch, tile_setting, max_patches, nested
):
    processor = processors_by_tile[tile_setting]
    token_id = tokenizer.convert_tokens_to_ids
    texts = ["<|image|>".join(pieces) for pieces, _ in batch]
    per_text = [[image(h, w, (c, 255 - c, c // 2)) for h, w, c in sizes] for _, sizes in batch]
    flat = [im for sample in per_text for im in sample]
    out = processor(text=texts, images=per_text if nested else flat, max_patches=max_patches)

    grids = processor.image_processor(flat, max_patches=max_patches)["aspect_ratios"].tolist() if flat else []
    per_tile = model_tokens_per_tile(*tile_setting)
    assert len(out["input_ids"]) == len(texts)
    assert out.get("pixel_values", np.zeros((0,))).shape[0] == sum(num_tiles(grid) for grid in grids)
    grid_iter = iter(grids)
    for ids, (pieces, sizes) in zip(out["input_ids"], batch):
        spans = image_spans(ids, token_id("<|image_start|>"), token_id("<|image_end|>"))
        assert len(spans) == len(sizes), f"{len(spans)} image runs for {len(sizes)} images"
        sample_grids = [next(grid_iter) for _ in sizes]
        assert ids.count(token_id(P)) == sum(num_tiles(g) for g in sample_grids) * per_tile
        for (start, end), grid in zip(spans, sample_grids):
            assert ids[start : end + 1] == expected_image_ids(token_id, grid, per_tile), f"layout of grid {grid}"
        # The text around the placeholders: tokenized piece by piece, and decoded back exactly.
        outside = [ids[:1]] + [
            ids[(spans[i - 1][1] + 1 if i else 1) : (spans[i][0] if i < len(spans) else len(ids))]
            for i in range(len(spans) + 1)
        ]
        assert outside[0] == [tokenizer.bos_token_id]
        assert outside[1:] == [tokenizer.encode(piece, add_special_tokens=False) for piece in pieces]
        remaining = [t for part in outside[1:] for t in part]
        assert not set(remaining) & {token_id(t) for t in IMAGE_TOKENS}
        assert tokenizer.decode(remaining) == "".join(pieces)


@settings(max_examples=50, deadline=None)
@given(placeholders=st.integers(0, 4), images=st.integers(0, 4), pieces=text_pieces(4), nested=st.booleans())
def test_placeholder_and_image_count_mismatch_names_both_counts(processor, placeholders, images, pieces, nested):
    assume(placeholders != images)
    text = "<|image|>".join(pieces[: placeholders + 1])
    given_images = [image(5 + i, 7, (i, i, i)) for i in range(images)]
    if nested:  # one list per text: the message names the text
        expected = rf"Text 0 has {placeholders} <\|image\|> placeholder\(s\) but {images} image\(s\)"
        given_images = [given_images]
    else:
        expected = rf"text has {placeholders} <\|image\|> placeholder\(s\) but {images} image"
    with pytest.raises(ValueError, match=expected):
        processor(text=[text], images=given_images)
