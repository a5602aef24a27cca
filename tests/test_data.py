"""Tests for llama4x.data: bundled Python docs, the train/eval split, and block packing."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama4x.data import pack_token_ids, python_docs_texts, train_eval_split


def test_python_docs_texts_are_nonempty_deterministic_and_sorted_by_topic():
    from pydoc_data.topics import topics

    texts = python_docs_texts()
    assert len(texts) >= 20
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert texts == python_docs_texts()
    assert texts == [topics[k] for k in sorted(topics) if topics[k].strip()]


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
