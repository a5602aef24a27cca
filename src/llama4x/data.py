"""Bundled data: text and images that ship with installed packages, so the demo and tests need no network.

`python_docs_texts()` returns the help topics of Python's own documentation (`pydoc_data.topics`), which every
CPython install carries. `pack_token_ids` turns tokenized documents into the fixed-size blocks a causal LM trains on;
`make_lm_blocks` tokenizes and packs texts into tensors, `lm_rows` into dataset rows, `block_batches` batches them.

`digits_vqa()` turns scikit-learn's bundled handwritten digits (the optional `demo` extra) into visual question
answering records (`parity_records` asks them a second question), and `DigitsCollator` turns those records into
supervised batches for a `Llama4XProcessor` model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .tokenization import EOT_TOKEN

if TYPE_CHECKING:
    import torch

    from .processing_llama4x import Llama4XProcessor

T = TypeVar("T")

DIGITS_QUESTION = "What digit is this?"
PARITY_QUESTION = "Is this digit even or odd?"
IGNORE_INDEX = -100  # label of positions without loss (transformers' convention)


def python_docs_texts() -> list[str]:
    """Return Python's documentation topics (`pydoc_data.topics.topics`), sorted by topic name for determinism.

    About 80 documents (~0.5 MB of English prose and code in CPython 3.11) from the language reference: statements,
    operators, the data model, etc. Empty topics are dropped, and so are repeats (the "if" and "else" topics share
    one text), so that a split of these documents cannot hold the same one on both sides.
    """
    from pydoc_data.topics import topics

    return list(dict.fromkeys(topics[key] for key in sorted(topics) if topics[key].strip()))


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


DOCS_EVAL_FRACTION = 0.1  # the share of the bundled docs held out by default (`distill` always holds out this one)


def python_docs_split(eval_fraction: float = DOCS_EVAL_FRACTION) -> tuple[list[str], list[str]]:
    """`(train, eval)` documents of `python_docs_texts()`: the one split that every llama4x command uses for the
    bundled docs (`train`, `distill`, `demo`, `bench balance`), whatever their seeds, so a student is never evaluated
    on documents its teacher trained on. One fixed order, cut at `eval_fraction`: the eval documents of a smaller
    fraction are among those of a larger one."""
    return train_eval_split(python_docs_texts(), eval_fraction=eval_fraction, seed=0)


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


def make_lm_blocks(
    tokenizer: Any, texts: Sequence[str], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize `texts` (BOS-prefixed), pack them EOS-separated into blocks; return `(input_ids, mask, labels)`,
    each `(N, block_size)`.

    Labels equal the input ids with the padding of the final block set to -100; the model shifts them itself.
    """
    import torch

    ids = tokenizer(list(texts))["input_ids"]
    blocks, masks = pack_token_ids(ids, block_size, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    input_ids = torch.tensor(blocks, dtype=torch.long)  # (N, T)
    attention_mask = torch.tensor(masks, dtype=torch.long)  # (N, T)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (N, T)
    return input_ids, attention_mask, labels


def lm_rows(tokenizer: Any, texts: Sequence[str], block_size: int) -> list[dict[str, torch.Tensor]]:
    """The blocks of `make_lm_blocks` as dataset rows `{"input_ids", "attention_mask", "labels"}`, each `(T,)`."""
    input_ids, attention_mask, labels = make_lm_blocks(tokenizer, texts, block_size)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": target}
        for ids, mask, target in zip(input_ids, attention_mask, labels)
    ]


def block_batches(
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """`make_lm_blocks` output cut, in order, into batches of `batch_size` blocks: dicts of `(B, T)` tensors."""
    input_ids, attention_mask, labels = blocks
    return [
        {"input_ids": input_ids[i : i + batch_size], "attention_mask": attention_mask[i : i + batch_size],
         "labels": labels[i : i + batch_size]}
        for i in range(0, input_ids.shape[0], batch_size)
    ]  # fmt: skip


def digits_vqa(image_size: int = 32, test_fraction: float = 0.2) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """scikit-learn's 1,797 handwritten digit scans as `(train, test)` visual question answering records.

    Each record is `{"image": PIL RGB image of image_size x image_size, "question": DIGITS_QUESTION, "answer": "7"}`.
    The 8x8 scans (ink intensity 0..16) are drawn as dark ink on white and upsampled bilinearly with PIL.

    The split is fixed, not random: the test split is the last `round(1797 * test_fraction)` scans in their
    published order (359 with the default), the train split the rest (1,438); both are the same on every call.

    Raises:
        ImportError: if scikit-learn is missing (install the extra: `pip install 'llama4x[demo]'`).
        ValueError: if `image_size` < 1 or `test_fraction` is not in (0, 1).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "digits_vqa needs scikit-learn, which is in llama4x's optional `demo` extra: "
            "pip install 'llama4x[demo]' (or: pip install scikit-learn)"
        ) from error
    import numpy as np
    from PIL import Image

    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be an int >= 1")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be in the open interval (0, 1)")
    digits = load_digits()
    ink = digits.images / 16.0  # (N, 8, 8) in [0, 1]
    pixels = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
    records = [
        {
            "image": Image.fromarray(scan).resize((image_size, image_size), Image.BILINEAR).convert("RGB"),
            "question": DIGITS_QUESTION,
            "answer": str(int(label)),
        }
        for scan, label in zip(pixels, digits.target)
    ]
    n_test = round(len(records) * test_fraction)
    return records[: len(records) - n_test], records[len(records) - n_test :]


def parity(answer: str) -> str:
    """The answer to `PARITY_QUESTION` about the digit `answer`: "even" or "odd"."""
    return "even" if int(answer) % 2 == 0 else "odd"


def parity_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `digits_vqa` records asked `PARITY_QUESTION` instead, answered "even" or "odd"."""
    return [{**record, "question": PARITY_QUESTION, "answer": parity(record["answer"])} for record in records]


def image_question_prompt(processor: Llama4XProcessor, question: str, num_images: int = 1) -> str:
    """The chat-templated prompt of one user turn with `num_images` images and then `question`, ending with the
    assistant header (the model's answer comes next). Images go to the processor in the same order."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class DigitsCollator:
    """Collate `digits_vqa` records into a batch for a model fed by a `Llama4XProcessor`.

    Each sequence is the chat-templated prompt (a user turn with `<|image|>` and the question, then the assistant
    header), followed, when `include_answer`, by the answer and `end_token` (`<|eot|>`, the end of an assistant turn
    in `CHAT_TEMPLATE`). Prompt and answer are tokenized separately, so the supervised tokens are exactly the ones a
    model generates after the prompt at inference.

    Returns a dict of tensors: `input_ids` and `attention_mask` `(B, L)`, `pixel_values` `(total_tiles, 3, t, t)`
    and, when `include_answer`, `labels` `(B, L)`: the answer and `end_token` ids, `-100` everywhere else (prompt,
    image tokens, padding). Padding uses the tokenizer's pad token, on the right by default (training); use
    `padding_side="left"` with `include_answer=False` to batch prompts for generation.
    """

    def __init__(
        self,
        processor: Llama4XProcessor,
        padding_side: str = "right",
        include_answer: bool = True,
        end_token: str = EOT_TOKEN,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the processor's tokenizer has no pad token; set tokenizer.pad_token first")
        self.processor = processor
        self.padding_side = padding_side
        self.include_answer = include_answer
        self.end_token = end_token
        self.pad_token_id = tokenizer.pad_token_id

    def prompt(self, question: str) -> str:
        """The chat-templated prompt for one question (ends with the assistant header)."""
        return image_question_prompt(self.processor, question)

    def _pad(self, row: list[int], value: int, length: int) -> list[int]:
        filler = [value] * (length - len(row))
        return row + filler if self.padding_side == "right" else filler + row

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        if not records:
            raise ValueError("cannot collate an empty list of records")
        prompts = [self.prompt(record["question"]) for record in records]
        # The template already starts with <|begin_of_text|>.
        encoded = self.processor(
            text=prompts, images=[[record["image"]] for record in records], add_special_tokens=False
        )
        sequences, labels = [], []
        for prompt_ids, record in zip(encoded["input_ids"], records):
            answer_ids = []
            if self.include_answer:
                answer_ids = self.processor.tokenizer(record["answer"] + self.end_token, add_special_tokens=False)[
                    "input_ids"
                ]
            sequences.append(list(prompt_ids) + answer_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)

        length = max(len(ids) for ids in sequences)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, target in zip(sequences, labels):
            batch["input_ids"].append(self._pad(ids, self.pad_token_id, length))
            batch["attention_mask"].append(self._pad([1] * len(ids), 0, length))
            batch["labels"].append(self._pad(target, IGNORE_INDEX, length))
        out = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
        if not self.include_answer:
            del out["labels"]
        out["pixel_values"] = torch.as_tensor(encoded["pixel_values"])
        return out
