"""Tests for the digits VQA data: sizes, the fixed split, pixels, the missing-extra error, and DigitsCollator's
padding and label masking (only the answer and its end-of-turn token are supervised)."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from llama4x import Llama4XImageProcessor, Llama4XProcessor
from llama4x.data import DIGITS_QUESTION, IGNORE_INDEX, DigitsCollator, digits_vqa, python_docs_texts
from llama4x.tokenization import EOT_TOKEN, train_tokenizer

TILE = 28


@pytest.fixture(scope="module")
def splits():
    return digits_vqa(image_size=TILE)


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_tokenizer(python_docs_texts()[:5], vocab_size=400)
    return Llama4XProcessor(Llama4XImageProcessor(size=TILE, max_patches=4), tokenizer, patch_size=7)


def test_sizes_split_and_records(splits):
    train, test = splits
    assert (len(train), len(test)) == (1438, 359)
    targets = load_digits().target
    assert [r["answer"] for r in train + test] == [str(t) for t in targets]  # published order, test = last 359
    assert {r["answer"] for r in train} == {r["answer"] for r in test} == {str(d) for d in range(10)}
    record = train[0]
    assert set(record) == {"image", "question", "answer"} and record["question"] == DIGITS_QUESTION
    assert isinstance(record["image"], Image.Image) and record["image"].size == (TILE, TILE)
    assert record["image"].mode == "RGB"


def test_split_is_deterministic_and_respects_the_fraction(splits):
    again_train, again_test = digits_vqa(image_size=TILE)
    train, test = splits
    assert [r["answer"] for r in again_test] == [r["answer"] for r in test]
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(again_test, test))
    small_train, small_test = digits_vqa(image_size=8, test_fraction=0.5)
    assert (len(small_train), len(small_test)) == (899, 898)  # round(898.5) == 898


def test_images_are_dark_ink_on_white():
    train, _ = digits_vqa(image_size=8)  # native size: PIL's resize to the same size keeps the pixels
    scan = load_digits().images[0]
    expected = np.round(255 * (1 - scan / 16)).astype(np.uint8)
    pixels = np.asarray(train[0]["image"])
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `import sklearn.datasets` fail
    with pytest.raises(ImportError, match=r"optional `demo` extra: pip install 'llama4x\[demo\]'"):
        digits_vqa()


@pytest.mark.parametrize("kwargs, message", [({"image_size": 0}, "image_size=0"), ({"test_fraction": 1.0}, "1.0")])
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        digits_vqa(**kwargs)


def test_collator_supervises_only_the_answer_and_eot(splits, processor):
    records = splits[0][:4]
    batch = DigitsCollator(processor)(records)
    tokenizer = processor.tokenizer
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["pixel_values"].shape == (4, 3, TILE, TILE)  # 28x28 digits: one tile each
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    for row, record in enumerate(records):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        supervised = labels != IGNORE_INDEX
        answer_ids = tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [eot]
        assert labels[supervised].tolist() == answer_ids
        assert torch.equal(ids[supervised], labels[supervised])
        length = int(mask.sum())
        assert supervised.nonzero().flatten().tolist() == list(range(length - len(answer_ids), length))
        prompt = DigitsCollator(processor).prompt(record["question"])
        assert tokenizer.decode(ids[: length - len(answer_ids)]).startswith(prompt.split("<|image|>")[0])
        assert ids[: length - len(answer_ids)].tolist().count(processor.patch_token_id) == processor.tokens_per_tile


def test_collator_pads_right_with_masked_labels_and_left_for_generation(processor):
    records = [
        {"image": Image.new("RGB", (TILE, TILE)), "question": "q?", "answer": "1"},
        {"image": Image.new("RGB", (3 * TILE, TILE)), "question": "a longer question?", "answer": "22"},
    ]
    right = DigitsCollator(processor)(records)
    pad = processor.tokenizer.pad_token_id
    lengths = right["attention_mask"].sum(-1).tolist()
    assert lengths[0] < lengths[1] == right["input_ids"].shape[1]
    assert right["attention_mask"][0].tolist() == [1] * lengths[0] + [0] * (lengths[1] - lengths[0])
    assert right["input_ids"][0, lengths[0] :].eq(pad).all() and right["labels"][0, lengths[0] :].eq(-100).all()
    assert right["pixel_values"].shape == (1 + 4, 3, TILE, TILE)  # second image: 3x1 tiles + thumbnail

    left = DigitsCollator(processor, padding_side="left", include_answer=False)(records)
    assert "labels" not in left
    n_pad = left["input_ids"].shape[1] - int(left["attention_mask"][0].sum())
    assert left["input_ids"][0, :n_pad].eq(pad).all() and left["attention_mask"][0, n_pad:].eq(1).all()
    prompt_ids = processor(text=DigitsCollator(processor).prompt("q?"), images=[records[0]["image"]])["input_ids"]
    assert left["input_ids"][0, n_pad:].tolist() == prompt_ids[0][1:]  # template BOS only, no second one


def test_collator_rejects_bad_arguments(processor):
    with pytest.raises(ValueError, match="padding_side='middle'"):
        DigitsCollator(processor, padding_side="middle")
    with pytest.raises(ValueError, match="empty list"):
        DigitsCollator(processor)([])
