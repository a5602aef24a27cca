"""Tests for llama4x.data: bundled Python docs, the train/eval split, and block packing."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama4x.data import (
    PARITY_QUESTION,
    block_batches,
    lm_rows,
    make_lm_blocks,
    pack_token_ids,
    parity_records,
    python_docs_texts,
    train_eval_split,
)


def test_python_docs_texts_are_nonempty_deterministic_and_sorted_by_topic():
    from pydoc_data.topics import topics

    texts = python_docs_texts()
    assert len(texts) >= 20
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert texts == python_docs_texts()
    first_topics = [min(k for k in topics if topics[k] == text) for text in texts]
    assert first_topics == sorted(first_topics)


def test_python_docs_texts_hold_each_topic_text_once_so_splits_do_not_leak():
    from pydoc_data.topics import topics

    texts = python_docs_texts()
    assert len(set(texts)) == len(texts)
    assert set(texts) == {text for text in topics.values() if text.strip()}
    for seed in range(3):
        train, evals = train_eval_split(texts, seed=seed)
        assert not set(train) & set(evals), f"seed {seed}: an eval document is also in train"


def test_python_docs_split_is_one_fixed_partition_whose_smaller_eval_sets_nest_in_larger_ones():
    from llama4x.data import python_docs_split

    train, evals = python_docs_split()
    assert sorted(train + evals) == sorted(python_docs_texts()) and not set(train) & set(evals)
    assert len(evals) == round(len(python_docs_texts()) * 0.1)
    assert (train, evals) == python_docs_split(0.1)
    assert set(python_docs_split(0.05)[1]) < set(evals) < set(python_docs_split(0.2)[1])


def test_train_eval_split_is_a_seeded_partition():
    texts = [f"doc {i}" for i in range(50)]
    train, evals = train_eval_split(texts, eval_fraction=0.1, seed=3)
    assert len(evals) == 5 and len(train) == 45
    assert sorted(train + evals) == sorted(texts)
    assert (train, evals) == train_eval_split(texts, eval_fraction=0.1, seed=3)
    assert evals != train_eval_split(texts, eval_fraction=0.1, seed=4)[1]


def test_train_eval_split_keeps_both_sides_nonempty():
    assert train_eval_split(["a", "b"], eval_fraction=0.01) in [(["a"], ["b"]), (["b"], ["a"])]
    train, evals = train_eval_split(["a", "b", "c"], eval_fraction=0.99)
    assert len(train) == 1 and len(evals) == 2


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 2])
def test_train_eval_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(["a", "b", "c"], eval_fraction=fraction)


def test_train_eval_split_rejects_too_few_texts():
    with pytest.raises(ValueError, match="at least 2"):
        train_eval_split(["only one"])


def test_pack_token_ids_by_hand():
    blocks, masks = pack_token_ids([[5, 6, 7], [8]], block_size=3, eos_id=1, pad_id=0)
    # stream: 5 6 7 <eos> 8 <eos>
    assert blocks == [[5, 6, 7], [1, 8, 1]]
    assert masks == [[1, 1, 1], [1, 1, 1]]
    blocks, masks = pack_token_ids([[5, 6], [7, 8, 9]], block_size=4, eos_id=1, pad_id=0)
    # stream: 5 6 <eos> 7 8 9 <eos> -> the last block is padded, and the padding is masked
    assert blocks == [[5, 6, 1, 7], [8, 9, 1, 0]]
    assert masks == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_pack_token_ids_pads_with_eos_by_default_and_handles_empty_input():
    assert pack_token_ids([[4]], block_size=4, eos_id=1) == ([[4, 1, 1, 1]], [[1, 1, 0, 0]])
    assert pack_token_ids([], block_size=4, eos_id=1) == ([], [])


@given(
    seqs=st.lists(st.lists(st.integers(3, 50), max_size=20), max_size=10),
    block_size=st.integers(1, 16),
)
def test_pack_token_ids_drops_nothing(seqs, block_size):
    blocks, masks = pack_token_ids(seqs, block_size=block_size, eos_id=1, pad_id=2)
    assert all(len(b) == block_size for b in blocks) and all(len(m) == block_size for m in masks)
    kept = [tok for block, mask in zip(blocks, masks) for tok, keep in zip(block, mask) if keep]
    assert kept == [tok for seq in seqs for tok in [*seq, 1]]
    assert all(m[-1] == 1 for m in masks[:-1])  # only the final block can hold padding


@pytest.mark.parametrize("block_size", [0, -1, 2.5])
def test_pack_token_ids_rejects_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        pack_token_ids([[1, 2]], block_size=block_size, eos_id=0)


class WordTokenizer:
    """Ids of whitespace-separated words (the word's length + 10), BOS-prefixed, as `tokenizer(texts)` returns them."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, texts):
        return {"input_ids": [[self.bos_token_id] + [len(w) + 10 for w in text.split()] for text in texts]}


def test_make_lm_blocks_by_hand_labels_padding_minus_100():
    input_ids, attention_mask, labels = make_lm_blocks(WordTokenizer(), ["a bb", "ccc"], block_size=4)
    # stream: <bos> 11 12 <eos> <bos> 13 <eos> -> the second block is padded with pad_token_id
    assert input_ids.tolist() == [[1, 11, 12, 2], [1, 13, 2, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels.tolist() == [[1, 11, 12, 2], [1, 13, 2, -100]]


def test_lm_rows_and_block_batches_hold_the_blocks_in_order():
    texts = ["a bb ccc", "dddd", "e ff ggg hhhh iiiii"]
    blocks = make_lm_blocks(WordTokenizer(), texts, block_size=3)
    rows = lm_rows(WordTokenizer(), texts, block_size=3)
    batches = block_batches(blocks, batch_size=2)
    assert len(rows) == 5  # 15 tokens: 12 words + 3 EOS
    for name, tensor in zip(("input_ids", "attention_mask", "labels"), blocks):
        assert [row[name].tolist() for row in rows] == tensor.tolist()
        assert [len(b[name]) for b in batches] == [2, 2, 1]
        assert [r for b in batches for r in b[name].tolist()] == tensor.tolist()


def test_parity_records_ask_the_parity_question_and_keep_the_image():
    records = [{"image": "img", "question": "What digit is this?", "answer": a} for a in ("0", "7", "8")]
    asked = parity_records(records)
    assert [r["answer"] for r in asked] == ["even", "odd", "even"]
    assert all(r["question"] == PARITY_QUESTION and r["image"] == "img" for r in asked)
    assert records[1]["answer"] == "7", "the input records are left unchanged"
