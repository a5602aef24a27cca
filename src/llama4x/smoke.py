"""Text language-modelling helpers shared by the demo (`llama4x.demo`) and the balancing benchmark: packing Python's
docs into training blocks and the held-out next-token loss.

The module keeps its historical name (it held the first smoke-run demo, which `llama4x demo` replaced) because
`llama4x.benchmarks.balance` imports it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, pack_token_ids

__all__ = ["IGNORE_INDEX", "evaluate_lm_loss", "make_lm_blocks"]


def make_lm_blocks(
    tokenizer: Any, texts: list[str], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize `texts` (BOS-prefixed), pack them EOS-separated into blocks; return `(input_ids, mask, labels)`.

    Labels equal the input ids with the padding of the final block set to -100; the model shifts them itself.
    """
    ids = tokenizer(texts)["input_ids"]
    blocks, masks = pack_token_ids(ids, block_size, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    input_ids = torch.tensor(blocks, dtype=torch.long)  # (N, T)
    attention_mask = torch.tensor(masks, dtype=torch.long)  # (N, T)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return input_ids, attention_mask, labels


@torch.no_grad()
def evaluate_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 8,
) -> float:
    """Token-weighted mean next-token cross-entropy of `model` on the given blocks.

    Computed from the logits rather than `outputs.loss`, so auxiliary terms the model adds to its training loss (MoE
    balancing / z-losses) do not leak into the reported held-out loss.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        logits = model(input_ids=input_ids[sl].to(device), attention_mask=attention_mask[sl].to(device)).logits
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V)
        shift_labels = labels[sl, 1:].to(device).reshape(-1)  # (B*(T-1),)
        total += F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)
