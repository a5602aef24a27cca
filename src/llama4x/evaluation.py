"""Held-out measurements shared by the demo, the distillation report and the benchmarks.

`evaluate_lm_loss` / `perplexity`: the token-weighted mean next-token cross-entropy of the supervised tokens
(labels != -100), computed from the logits so that the balancing losses a MoE model adds to `outputs.loss` stay out.
`answer_questions` / `exact_match` / `answer_accuracy`: greedy answers to image questions (`digits_vqa` records) and
how many match the records' answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, DigitsCollator
from .tokenization import EOT_TOKEN

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values")


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode without gradients; yields the model's device and restores its training mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """`(sum of the next-token cross-entropies, number of tokens counted)` of `logits` `(B, T, V)` against `labels`
    `(B, T)` (shifted here; -100 not counted). In fp32: bf16 logits would round the per-token terms."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:].to(logits.device)  # (B, T-1)
    total = F.cross_entropy(shift_logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total.item(), int((targets != IGNORE_INDEX).sum())


def evaluate_lm_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token cross-entropy of `model` on `batches` (dicts with `labels` and the model inputs
    `input_ids`, optionally `attention_mask`, `position_ids` and `pixel_values`; other keys are ignored). Without
    `position_ids`, positions count each row's real tokens, so left padding changes no row's loss (a model given
    none counts the padding)."""
    total, count = 0.0, 0
    with evaluating(model) as device:
        for batch in batches:
            inputs = {key: batch[key].to(device) for key in MODEL_INPUTS if key in batch}
            if "attention_mask" in inputs and "position_ids" not in inputs:
                inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
            batch_total, batch_count = next_token_loss_sum(model(**inputs).logits, batch["labels"])
            total, count = total + batch_total, count + batch_count
    return total / max(count, 1)


def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """`exp` of `evaluate_lm_loss`, the loss capped at 80 nats so that a diverged model still reports a number."""
    return math.exp(min(evaluate_lm_loss(model, batches), 80.0))


def answer_questions(
    model: torch.nn.Module, processor, records: Sequence[dict[str, Any]], batch_size: int = 64, verbose: bool = False
) -> list[str]:
    """The model's greedy answers (decoded up to `<|eot|>`, stripped) to the records' image questions."""
    collator = DigitsCollator(processor, padding_side="left", include_answer=False)
    tokenizer = processor.tokenizer
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    answers = []
    starts = range(0, len(records), batch_size)
    with evaluating(model) as device:
        for start in tqdm(starts, desc="answering", disable=not verbose, leave=False, dynamic_ncols=True):
            batch = {key: value.to(device) for key, value in collator(records[start : start + batch_size]).items()}
            generated = model.generate(
                **batch, max_new_tokens=4, do_sample=False, eos_token_id=eot, pad_token_id=tokenizer.pad_token_id
            )
            for row in generated[:, batch["input_ids"].shape[1] :].tolist():
                row = row[: row.index(eot)] if eot in row else row
                answers.append(tokenizer.decode(row).strip())
    return answers


def exact_match(answers: Sequence[str], records: Sequence[dict[str, Any]]) -> float:
    """Share of `answers` equal to the records' answers."""
    return sum(a == r["answer"] for a, r in zip(answers, records, strict=True)) / max(len(records), 1)


def answer_accuracy(
    model: torch.nn.Module, processor, records: Sequence[dict[str, Any]], batch_size: int = 64
) -> float:
    """Exact-match accuracy of the model's greedy answers to the records' image questions."""
    return exact_match(answer_questions(model, processor, records, batch_size), records)
