"""The data of `llama4x train`: what `--dataset` names, loaded, tokenized and collated for the Trainer.

Datasets (`--dataset`):
    pydocs               Python's own documentation (bundled), language modelling;
    digits               scikit-learn's handwritten digits as visual question answering (needs a multimodal model);
    PATH.txt             language modelling on the text (one example per paragraph by default);
    PATH.jsonl / .json / .parquet, by columns:
        `text`                        language modelling;
        `prompt` + `answer`           chat (one user turn, one assistant turn);
        `messages`                    chat (`[{"role": ..., "content": ...}, ...]`);
        `image` + `prompt` + `answer` image-text chat (`image` a path, relative to the data file's folder).
Language-modelling text is packed into `--block-size` blocks, EOS after each document (`--no-packing`: one example
per document, ending with EOS, truncated to the block).
Chat uses the chat template of the tokenizer (llama4x's by default); with `--answer-only-loss` (the default) only
assistant tokens are supervised. Part of the data (`--eval-fraction`) is held out; the final metrics include the
eval LM loss, perplexity and next-token accuracy on supervised tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .data import IGNORE_INDEX, pack_token_ids, python_docs_split, python_docs_texts
from .image_sources import open_image
from .tokenization import CHAT_TEMPLATE

logger = logging.get_logger(__name__)

BUNDLED_DATASETS = ("pydocs", "digits")
_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataArguments:
    dataset: str = field(
        default="pydocs",
        metadata={
            "help": "pydocs | digits | path to a .txt, .jsonl/.json or .parquet file (see `llama4x.training_data`)."
        },
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Separate eval file (same format); otherwise --eval-fraction is held out."}
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the examples (documents) held out for evaluation; 0 disables it. For pydocs, the "
            "bundled docs' fixed split (`llama4x.data.python_docs_split`), whatever the seed."
        },
    )
    block_size: int = field(
        default=256, metadata={"help": "Tokens per packed block; the maximum length of other examples."}
    )
    packing: bool = field(
        default=True, metadata={"help": "Pack language-modelling text into full blocks (EOS between documents)."}
    )
    answer_only_loss: bool = field(
        default=True, metadata={"help": "For chat data, supervise only the assistant turns (else every token)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column of language-modelling text."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column of the user prompt (chat data)."})
    answer_column: str = field(default="answer", metadata={"help": "Column of the assistant answer (chat data)."})
    messages_column: str = field(default="messages", metadata={"help": "Column of conversations (chat data)."})
    image_column: str = field(default="image", metadata={"help": "Column of image paths (image-text data)."})
    text_sample_by: str = field(
        default="paragraph", metadata={"help": "How a .txt file splits into examples: line, paragraph or document."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (after packing)."}
    )

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"--block-size {self.block_size!r}: expected an integer >= 1.")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction {self.eval_fraction!r}: expected a share in [0, 1).")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max-train-samples {self.max_train_samples!r}: expected an integer >= 1.")
        if self.text_sample_by not in ("line", "paragraph", "document"):
            raise ValueError(f"--text-sample-by {self.text_sample_by!r}: expected line, paragraph or document.")


@dataclass
class TrainData:
    """What the Trainer needs from the data: datasets, their collator and the kind (`lm`, `chat`, `image_text`)."""

    kind: str
    train: Any
    eval: Any | None
    collator: Any


class PaddingCollator:
    """Pad `input_ids` / `attention_mask` / `labels` lists to the longest row (right padding; labels with -100)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(row[key]) + [pad] * (length - len(row[key])) for row in rows], dtype=torch.long)
            for key, pad in pads.items()
        }


def _load_file(path: str, data_args: DataArguments, option: str = "--dataset"):
    import datasets
    from datasets.exceptions import DatasetGenerationError

    suffix = Path(path).suffix.lower()
    if suffix not in _FILE_BUILDERS:
        expected = f"one of {BUNDLED_DATASETS} or " if option == "--dataset" else ""
        raise ValueError(f"{option} {path!r}: expected {expected}a file ending in {sorted(_FILE_BUILDERS)}.")
    if not Path(path).is_file():
        raise ValueError(f"{option} {path!r} is not a file.")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{option} {path!r} is empty.")
    kwargs = {}
    if suffix == ".txt":
        kwargs["sample_by"] = data_args.text_sample_by
    try:
        rows = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
    except DatasetGenerationError as error:  # the cause (a JSON or Arrow error) is chained
        cause = error.__cause__ or error
        raise ValueError(f"{option} {path!r} cannot be read as {suffix} data: {cause}") from error
    if len(rows) == 0:
        raise ValueError(f"{option} {path!r} holds no examples.")
    return rows


def data_kind(columns: Sequence[str], data_args: DataArguments) -> str:
    """`image_text`, `chat` or `lm` from a table's column names."""
    has = set(columns)
    prompt_answer = {data_args.prompt_column, data_args.answer_column} <= has
    if data_args.image_column in has and prompt_answer:
        return "image_text"
    if data_args.messages_column in has or prompt_answer:
        return "chat"
    if data_args.text_column in has:
        return "lm"
    raise ValueError(
        f"Cannot tell the kind of data from its columns {sorted(has)}: expected {data_args.text_column!r} (language "
        f"modelling), {data_args.messages_column!r} or {data_args.prompt_column!r} + {data_args.answer_column!r} (chat), "
        f"or {data_args.image_column!r} + prompt + answer (image-text); see the --*-column options."
    )


def conversation(row: dict[str, Any], data_args: DataArguments) -> list[dict[str, Any]]:
    """The messages of one chat row (a `messages` list, or a prompt/answer pair)."""
    if data_args.messages_column in row and row[data_args.messages_column] is not None:
        return list(row[data_args.messages_column])
    return [
        {"role": "user", "content": row[data_args.prompt_column]},
        {"role": "assistant", "content": row[data_args.answer_column]},
    ]


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], max_length: int, answer_only: bool = True
) -> dict[str, list[int]]:
    """`input_ids` and `labels` of a conversation rendered with the tokenizer's chat template.

    The rendering is cut at every assistant turn and the pieces are tokenized separately, so the supervised tokens
    (each assistant reply and its end-of-turn token) are exactly those a model generates after the templated prompt
    (`apply_chat_template(..., add_generation_prompt=True)`). Truncated to `max_length` tokens.
    """
    template = tokenizer.chat_template or CHAT_TEMPLATE

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(i, True)
        reply = render(i + 1, False)
        for text, supervised in ((prompt[len(rendered) :], not answer_only), (reply[len(prompt) :], True)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        rendered = reply
    tail = render(len(messages), False)[len(rendered) :]  # turns after the last assistant reply
    if tail:
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if not answer_only else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _lm_dataset(texts, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, column: str):
    """Tokenized (and packed) language-modelling examples from a `datasets.Dataset` with a text column."""
    block, eos = data_args.block_size, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no `eos_token`: language-modelling examples end each document with it.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = texts.filter(lambda row: bool(row[column] and row[column].strip()))

    def tokenize(batch):
        ids = tokenizer(batch[column])["input_ids"]
        if data_args.packing:
            blocks, masks = pack_token_ids(ids, block, eos_id=eos, pad_id=pad)
        else:  # each document ends with EOS as in a packed stream (unless the block cuts it)
            blocks = [(row + [eos])[:block] for row in ids]
            masks = [[1] * len(row) for row in blocks]
        labels = [[t if m else IGNORE_INDEX for t, m in zip(b, ms)] for b, ms in zip(blocks, masks)]
        return {"input_ids": blocks, "attention_mask": masks, "labels": labels}

    return texts.map(tokenize, batched=True, remove_columns=texts.column_names, desc="tokenizing")


def _chat_dataset(rows, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, split: str):
    """Tokenized chat examples; those that --block-size cuts before any supervised token are dropped, with a warning
    that counts them, and a `ValueError` if none is left."""

    def tokenize(row):
        out = tokenize_chat(tokenizer, conversation(row, data_args), data_args.block_size, data_args.answer_only_loss)
        return {**out, "attention_mask": [1] * len(out["input_ids"])}

    tokenized = rows.map(tokenize, remove_columns=rows.column_names, desc="tokenizing")
    kept = tokenized.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"]))
    dropped = len(tokenized) - len(kept)
    if dropped == len(tokenized):
        raise ValueError(
            f"No {split} example is left: --block-size {data_args.block_size} cuts all {dropped} chat examples before "
            "their first supervised token; raise --block-size."
        )
    if dropped:
        logger.warning(
            f"{dropped} of {len(tokenized)} {split} chat examples dropped: --block-size {data_args.block_size} cuts "
            "them before their first supervised token."
        )
    return kept


class ImageTextRecords(torch.utils.data.Dataset):
    """Image-text rows as `{"image": PIL image, "question": ..., "answer": ...}` records, images decoded on access.
    Every image path is checked when the data is built, so a missing file stops the run before training starts."""

    def __init__(self, rows, data_args: DataArguments, root: Path, max_pixels: int):
        self.rows, self.data_args, self.root, self.max_pixels = rows, data_args, root, max_pixels
        missing = [
            f"row {index}: {path}"
            for index, image in enumerate(rows[data_args.image_column])
            if isinstance(image, str) and not (path := self._path(image)).is_file()
        ]
        if missing:
            raise ValueError(f"{len(missing)} image file(s) do not exist: {', '.join(missing[:5])}.")

    def _path(self, image: str) -> Path:
        return Path(image) if Path(image).is_absolute() else self.root / image

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, args = self.rows[index], self.data_args
        image = row[args.image_column]
        if isinstance(image, str):
            image = open_image(self._path(image), self.max_pixels)
        return {"image": image, "question": row[args.prompt_column], "answer": row[args.answer_column]}


def _split(dataset, fraction: float, seed: int):
    if fraction == 0:
        return dataset, None
    if len(dataset) < 2:
        raise ValueError(
            f"{len(dataset)} example(s): need at least 2 to hold out an eval split (or --eval-fraction 0)."
        )
    parts = dataset.train_test_split(test_size=max(1, round(len(dataset) * fraction)), seed=seed)
    return parts["train"], parts["test"]


def load_raw_data(data_args: DataArguments, seed: int = 0) -> tuple[str, Any, Any | None, Path | None]:
    """`(kind, train, eval, root)` of untokenized rows: `datasets.Dataset`s, or record lists for digits."""
    if data_args.dataset == "pydocs":
        import datasets

        column = data_args.text_column
        if data_args.eval_fraction == 0:
            return "lm", datasets.Dataset.from_dict({column: python_docs_texts()}), None, None
        train, held_out = python_docs_split(data_args.eval_fraction)  # the split `distill` and the demo use too
        return "lm", datasets.Dataset.from_dict({column: train}), datasets.Dataset.from_dict({column: held_out}), None
    if data_args.dataset == "digits":
        from .data import digits_vqa

        train, test = digits_vqa()
        return "digits", train, (test if data_args.eval_fraction > 0 else None), None
    rows = _load_file(data_args.dataset, data_args)
    kind = data_kind(rows.column_names, data_args)
    if data_args.eval_dataset:
        eval_rows = _load_file(data_args.eval_dataset, data_args, option="--eval-dataset")
        train, evaluation = rows, eval_rows
    else:
        train, evaluation = _split(rows, data_args.eval_fraction, seed)
    return kind, train, evaluation, Path(data_args.dataset).parent


def texts_for_tokenizer(kind: str, rows, data_args: DataArguments) -> list[str]:
    """The training text a new tokenizer learns from."""
    if kind == "lm":
        return [text for text in rows[data_args.text_column] if text]
    if kind == "chat":
        return [message["content"] for row in rows for message in conversation(row, data_args) if message["content"]]
    raise ValueError(f"A new tokenizer cannot be trained for {kind} data: pass --model or --tokenizer.")


def build_data(kind: str, train, evaluation, root, processing, data_args: DataArguments) -> TrainData:
    """Tokenize / wrap the raw rows for the Trainer."""
    if kind in ("digits", "image_text"):
        from .data import DigitsCollator

        if not hasattr(processing, "image_processor"):
            raise ValueError(
                f"--dataset {data_args.dataset}: image-text data needs a multimodal model with a processor."
            )
        if kind == "image_text":
            max_pixels = processing.image_processor.max_image_pixels
            train = ImageTextRecords(train, data_args, root, max_pixels)
            if evaluation is not None:
                evaluation = ImageTextRecords(evaluation, data_args, root, max_pixels)
        return TrainData(kind, train, evaluation, DigitsCollator(processing))
    tokenizer = processing
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if kind == "lm":
        make = lambda rows, split: _lm_dataset(rows, tokenizer, data_args, data_args.text_column)
    else:
        make = lambda rows, split: _chat_dataset(rows, tokenizer, data_args, split)
    train = make(train, "training")
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    evaluation = make(evaluation, "eval") if evaluation is not None else None
    return TrainData(kind, train, evaluation, PaddingCollator(pad))
