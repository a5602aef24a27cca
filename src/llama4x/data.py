"""Bundled data: text that ships with Python itself, so the demo and tests need no network.

`python_docs_texts()` returns the help topics of Python's own documentation (`pydoc_data.topics`), which every
CPython install carries. `pack_token_ids` turns tokenized documents into the fixed-size blocks a causal LM trains on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def python_docs_texts() -> list[str]:
    """Return Python's documentation topics (`pydoc_data.topics.topics`), sorted by topic name for determinism.

    About 80 documents (~0.5 MB of English prose and code in CPython 3.11) from the language reference: statements,
    operators, the data model, etc. Empty topics are dropped.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics) if topics[key].strip()]


def train_eval_split(texts: Sequence[T], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[T], list[T]]:
    """Shuffle `texts` with `seed` and split them into `(train, eval)`.

    The eval split has `round(len(texts) * eval_fraction)` items, but at least one, and the train split keeps at least
    one, so both are non-empty whenever `len(texts) >= 2`.

    Raises:
        ValueError: if `eval_fraction` is not in (0, 1) or `texts` has fewer than 2 items.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction!r} must be in the open interval (0, 1)")
    if len(texts) < 2:
        raise ValueError(f"texts has {len(texts)} item(s); need at least 2 to make a train and an eval split")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(texts) * eval_fraction)), len(texts) - 1)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return [texts[i] for i in train_idx], [texts[i] for i in eval_idx]


def pack_token_ids(
    sequences: Sequence[Sequence[int]],
    block_size: int,
    eos_id: int,
    pad_id: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Concatenate token-id sequences, each followed by `eos_id`, and cut the stream into blocks of `block_size`.

    Nothing is dropped: the last, partial block is padded to `block_size` with `pad_id` (default: `eos_id`) and its
    padding is marked in the returned attention masks (0 = padding), so callers can set those labels to -100.

    Args:
        sequences: tokenized documents (e.g. `tokenizer(texts)["input_ids"]`).
        block_size: number of tokens per block.
        eos_id: separator appended after every document.
        pad_id: filler for the final block; defaults to `eos_id`.

    Returns:
        `(blocks, attention_masks)`: two lists of equal length, each inner list has `block_size` items. Empty when
        `sequences` is empty.

    Raises:
        ValueError: if `block_size` < 1.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be an int >= 1")
    pad_id = eos_id if pad_id is None else pad_id
    stream: list[int] = []
    for ids in sequences:
        stream.extend(ids)
        stream.append(eos_id)
    blocks, masks = [], []
    for start in range(0, len(stream), block_size):
        block = stream[start : start + block_size]
        n_pad = block_size - len(block)
        blocks.append(block + [pad_id] * n_pad)
        masks.append([1] * len(block) + [0] * n_pad)
    return blocks, masks
