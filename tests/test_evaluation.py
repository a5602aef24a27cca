"""Tests for `llama4x.evaluation`: the held-out next-token loss against a float64 recomputation, and exact match."""

import pytest
import torch

from llama4x.evaluation import evaluate_lm_loss, exact_match, perplexity
from tiny import random_ids, randomize_to_unit_scale, tiny_model


def lm_batches() -> list[dict[str, torch.Tensor]]:
    """Two batches with different padding and prompt masks (labels -100), one with an extra key to ignore."""
    batches = []
    for seed, pad in ((0, 3), (1, 0)):
        input_ids = random_ids(2, 10, seed=seed)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 10 - pad :] = 0
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :2] = -100
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    batches[0]["unused"] = torch.zeros(2)
    return batches


def test_lm_loss_is_the_token_weighted_float64_cross_entropy_without_balancing_losses():
    model = tiny_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.5)
    randomize_to_unit_scale(model, 3)
    model.train()
    batches = lm_batches()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logprobs = logits[:, :-1].double().log_softmax(-1)  # (B, T-1, V)
            targets = batch["labels"][:, 1:]  # (B, T-1)
            counted = targets != -100
            total -= logprobs.gather(-1, targets.clamp_min(0)[..., None])[..., 0][counted].sum()
            count += int(counted.sum())
    model.train()
    expected = (total / count).item()

    loss = evaluate_lm_loss(model, batches)
    assert loss == pytest.approx(expected, rel=1e-6), f"max difference {abs(loss - expected):.3g}"
    assert model.training, "the training mode is restored"
    assert perplexity(model, batches) == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-6)
    with torch.no_grad():
        batch = batches[1]
        trained_loss = model.eval()(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.item()
    single = evaluate_lm_loss(model, [batch])
    assert trained_loss > single + 1e-3, "outputs.loss adds the balancing losses; the evaluation leaves them out"


def test_exact_match_counts_equal_answers_and_refuses_a_length_mismatch():
    records = [{"answer": "7"}, {"answer": "even"}, {"answer": "3"}]
    assert exact_match(["7", "odd", "3"], records) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["7"], records)
