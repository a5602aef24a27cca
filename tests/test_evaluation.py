"""Tests for `llama4x.evaluation`: the held-out next-token loss against a float64 recomputation, exact match, and
greedy answers and answer loss that match one-record-at-a-time references whatever the batch size."""

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


def test_lm_loss_of_a_left_padded_batch_is_the_loss_of_its_rows_alone():
    """Left padding is what llama4x's tokenizers do by default; the model alone counts the padding as positions."""
    model = tiny_model()
    randomize_to_unit_scale(model, 3)
    rows = [random_ids(1, 20, seed=5)[0], random_ids(1, 9, seed=6)[0]]  # 20 and 9 tokens: across chunks of 8
    input_ids = torch.zeros(2, 20, dtype=torch.long)
    attention_mask = torch.zeros(2, 20, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, -len(row) :], attention_mask[i, -len(row) :] = row, 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[1, -len(rows[1])] = -100  # the first token has no prediction alone (in the batch, padding predicts it)
    batched = evaluate_lm_loss(model, [{"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}])
    alone = [evaluate_lm_loss(model, [{"input_ids": row[None], "labels": row[None]}]) for row in rows]
    expected = (alone[0] * 19 + alone[1] * 8) / 27  # token-weighted: 19 and 8 predicted tokens
    assert batched == pytest.approx(expected, rel=1e-6)


def test_exact_match_counts_equal_answers_and_refuses_a_length_mismatch():
    records = [{"answer": "7"}, {"answer": "even"}, {"answer": "3"}]
    assert exact_match(["7", "odd", "3"], records) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["7"], records)


def digits_model_and_processor():
    """A tiny random multimodal model with a trained tokenizer and a processor of up to 4 tiles per image."""
    from llama4x import Llama4XConfig, Llama4XForConditionalGeneration, Llama4XImageProcessor, Llama4XProcessor
    from llama4x.configuration_llama4x import SPECIAL_TOKEN_PRESETS
    from llama4x.data import DIGITS_QUESTION, python_docs_texts
    from llama4x.tokenization import train_tokenizer
    from tiny import tiny_multimodal_config, tiny_text_config

    tokenizer = train_tokenizer(python_docs_texts()[:2] + [DIGITS_QUESTION, "0 1 2 3 4 5 6 7 8 9"], vocab_size=300)
    text = tiny_text_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config = Llama4XConfig(
        text_config=text, vision_config=tiny_multimodal_config().vision_config, **SPECIAL_TOKEN_PRESETS["tiny"]
    )
    torch.manual_seed(0)
    model = Llama4XForConditionalGeneration(config).eval()
    randomize_to_unit_scale(model, 1)
    processor = Llama4XProcessor(Llama4XImageProcessor(size=32, max_patches=4), tokenizer, patch_size=8)
    return model, processor


def test_answers_and_answer_loss_do_not_depend_on_the_batch_size():
    from PIL import Image

    from llama4x.data import DigitsCollator
    from llama4x.evaluation import answer_questions
    from llama4x.tokenization import EOT_TOKEN

    model, processor = digits_model_and_processor()
    generator = torch.Generator().manual_seed(0)
    records = [  # other image shapes and questions: prompts of other lengths, left-padded in a batch
        {"image": Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).byte().numpy()),
         "question": question, "answer": str(i)}
        for i, (h, w, question) in enumerate([(32, 32, "What?"), (32, 64, "What digit is this?"), (64, 64, "Hm?")])
    ]  # fmt: skip
    eot = processor.tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    expected = []
    with torch.no_grad():  # greedy decoding by hand, one record at a time, no cache
        for record in records:
            batch = DigitsCollator(processor, include_answer=False)([record])
            prompt_length = batch["input_ids"].shape[1]
            for _ in range(4):
                next_id = model(**batch).logits[0, -1].argmax()
                if next_id == eot:
                    break
                batch["input_ids"] = torch.cat([batch["input_ids"], next_id.view(1, 1)], dim=1)
                batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            expected.append(processor.tokenizer.decode(batch["input_ids"][0, prompt_length:]).strip())
    assert answer_questions(model, processor, records, batch_size=1) == expected
    assert answer_questions(model, processor, records, batch_size=3) == expected

    collator = DigitsCollator(processor)
    one_by_one = evaluate_lm_loss(model, [collator([record]) for record in records])
    together = evaluate_lm_loss(model, [collator(records)])
    assert together == pytest.approx(one_by_one, rel=1e-5), f"max difference {abs(together - one_by_one):.3g}"
