"""Load balancing: losses against hand computations, the loss-free bias, group-limited routing, statistics."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from llama4x.balancing import expert_load, load_balancing_loss, load_entropy, router_z_loss, update_balancing_bias
from llama4x.moe import route
from llama4x.monitoring import RoutingStatsCallback
from tiny import random_ids, tiny_model, tiny_text_config

# A fixed routing of 2 sequences x 3 tokens over 4 experts.
LOGITS = torch.tensor(
    [
        [[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4], [-1.0, 3.0, 0.0, 1.0]],
        [[0.0, 0.7, 2.0, -2.0], [1.5, 1.0, -0.5, 0.2], [0.3, -0.3, 0.9, 2.5]],
    ],
    dtype=torch.float64,
)


def _hand_probabilities(token_logits, score_func):
    if score_func == "softmax":
        exp = [math.exp(v) for v in token_logits]
        return [e / sum(exp) for e in exp]
    sig = [1 / (1 + math.exp(-v)) for v in token_logits]
    return [s / sum(sig) for s in sig]


def _hand_aux_loss(logits, mask, k, score_func, per_sequence):
    """E * sum_i f_i P_i over the unmasked tokens, the top-k taken from the logits by hand."""
    E = len(logits[0][0])
    groups = [[(b, s) for s in range(len(logits[b])) if mask[b][s]] for b in range(len(logits))]
    if not per_sequence:
        groups = [[t for g in groups for t in g]]
    losses = []
    for tokens in groups:
        f, p = [0.0] * E, [0.0] * E
        for b, s in tokens:
            row = logits[b][s]
            for e in sorted(range(E), key=lambda i: -row[i])[:k]:
                f[e] += 1 / (len(tokens) * k)
            for e, prob in enumerate(_hand_probabilities(row, score_func)):
                p[e] += prob / len(tokens)
        losses.append(E * sum(fi * pi for fi, pi in zip(f, p)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("aux_type", ["global", "sequence"])
@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_equals_hand_computation_and_ignores_padding(score_func, aux_type, k):
    config = tiny_text_config(
        num_local_experts=4, num_experts_per_tok=k, router_score_func=score_func, router_aux_loss_type=aux_type
    )
    mask = torch.tensor([[False, True, True], [True, True, True]])  # first token of sequence 0 is padding
    logits_TE = LOGITS.reshape(6, 4)
    topk = logits_TE.topk(k, dim=-1).indices
    loss = load_balancing_loss(logits_TE, topk, mask, config).item()
    expected = _hand_aux_loss(LOGITS.tolist(), mask.tolist(), k, score_func, aux_type == "sequence")
    assert abs(loss - expected) < 1e-12, f"{loss} vs {expected}"


def test_sequence_aux_loss_averages_only_sequences_with_tokens():
    config = tiny_text_config(num_local_experts=4, num_experts_per_tok=1, router_aux_loss_type="sequence")
    logits_TE = LOGITS.reshape(6, 4)
    topk = logits_TE.topk(1, dim=-1).indices
    second_alone = load_balancing_loss(logits_TE[3:], topk[3:], torch.ones(1, 3, dtype=torch.bool), config)
    first_padded = torch.tensor([[False, False, False], [True, True, True]])
    assert load_balancing_loss(logits_TE, topk, first_padded, config).item() == pytest.approx(second_alone.item())
    assert load_balancing_loss(logits_TE, topk, torch.zeros(2, 3, dtype=torch.bool), config).item() == 0.0


def test_z_loss_equals_hand_computation_and_ignores_padding():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = router_z_loss(LOGITS.reshape(6, 4), mask).item()
    rows = [LOGITS[b, s].tolist() for b in range(2) for s in range(3) if mask[b, s]]
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    assert abs(loss - expected) < 1e-12, f"{loss} vs {expected}"


def test_lm_loss_plus_weighted_balancing_losses_is_the_training_loss():
    model = tiny_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    input_ids = random_ids(2, 12)
    out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    lm = F.cross_entropy(logits, input_ids[:, 1:].reshape(-1))
    expected = lm + 0.1 * out.aux_loss + 0.01 * out.z_loss
    assert torch.allclose(out.loss, expected, atol=1e-6), f"{out.loss.item()} vs {expected.item()}"
    out.loss.backward()
    assert model.model.layers[0].feed_forward.router.weight.grad.abs().sum() > 0


def test_padding_tokens_do_not_count_in_loads_or_losses():
    model = tiny_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.1)
    input_ids = random_ids(2, 12)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    other_padding = input_ids.clone()
    other_padding[0, :5] = random_ids(1, 5, seed=7)
    outs = [
        model(input_ids=ids, attention_mask=attention_mask, output_router_logits=True)
        for ids in (input_ids, other_padding)
    ]
    real_tokens = int(attention_mask.sum())
    assert outs[0].expert_load.sum(dim=-1).tolist() == [real_tokens * 2] * 4
    assert torch.equal(outs[0].expert_load, outs[1].expert_load)
    assert torch.allclose(outs[0].aux_loss, outs[1].aux_loss, atol=1e-6)
    assert torch.allclose(outs[0].z_loss, outs[1].z_loss, atol=1e-6)


def test_selection_bias_changes_the_choice_but_not_the_combine_weight():
    config = tiny_text_config(num_experts_per_tok=1, router_bias_update_rate=0.01)
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(8)
    bias[5] = 10.0
    unbiased, biased = route(logits, config), route(logits, config, bias)
    assert (biased.topk_index == 5).all()
    assert not (unbiased.topk_index == 5).all()
    assert torch.allclose(biased.topk_weight[:, 0], torch.sigmoid(logits[:, 5]))


def _bias(model, layer=0):
    return model.model.moe_blocks[layer].e_score_correction_bias


def _train_step(model, optimizer, micro_batches, seed):
    loads = []
    for i in range(micro_batches):
        input_ids = random_ids(4, 16, seed=seed * 100 + i)
        out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
        out.loss.backward()
        loads.append(out.expert_load)
    optimizer.step()
    optimizer.zero_grad()
    return torch.stack(loads).sum(0)


def test_bias_update_moves_an_overloaded_expert_toward_the_mean():
    rate = 0.05
    model = tiny_model(num_experts_per_tok=1, router_bias_update_rate=rate).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # only the balancing bias changes
    with torch.no_grad():
        _bias(model)[0] = 1.0  # sigmoid scores are < 1: expert 0 takes every token of layer 0
    biases, loads = [], []
    for step in range(30):
        loads.append(_train_step(model, optimizer, 1, step)[0, 0].item())
        biases.append(_bias(model)[0].item())
    assert loads[0] == 4 * 16
    assert biases[:5] == pytest.approx([1.0 - rate * (i + 1) for i in range(5)])
    assert loads[-1] < loads[0] / 4, f"expert 0 load went {loads[0]} -> {loads[-1]}"


def test_bias_rate_set_after_building_is_refused_at_the_first_step_by_name():
    model = tiny_model(num_experts_per_tok=1).train()  # built without the balancing bias
    model.config.router_bias_update_rate = 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="router_bias_update_rate"):
        _train_step(model, optimizer, 1, 0)


def test_one_bias_update_per_optimizer_step_from_all_micro_batches():
    rate = 0.01
    model = tiny_model(num_experts_per_tok=1, router_bias_update_rate=rate).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    load = _train_step(model, optimizer, micro_batches=3, seed=0)
    for layer, layer_load in enumerate(load.double()):
        expected = rate * torch.sign(layer_load.mean() - layer_load)
        assert torch.allclose(_bias(model, layer).double(), expected), f"layer {layer}"


def test_no_bias_update_in_eval_mode_or_without_gradients():
    model = tiny_model(router_bias_update_rate=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.eval()
    model(input_ids=random_ids(2, 16)).logits.sum().backward()
    optimizer.step()
    model.train()
    with torch.no_grad():
        model(input_ids=random_ids(2, 16))
    optimizer.step()
    assert all((block.e_score_correction_bias == 0).all() for block in model.model.moe_blocks)


def test_bias_survives_save_and_load(tmp_path):
    model = tiny_model(router_bias_update_rate=0.01)
    with torch.no_grad():
        for block in model.model.moe_blocks:
            block.e_score_correction_bias.copy_(torch.randn(8))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for saved, restored in zip(model.model.moe_blocks, loaded.model.moe_blocks):
        assert restored.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(saved.e_score_correction_bias, restored.e_score_correction_bias)


def test_trainer_applies_one_bias_update_per_optimizer_step_and_logs_routing_stats(tmp_path):
    model = tiny_model(num_experts_per_tok=1, router_bias_update_rate=0.01).train()
    updates = []
    original = model.model.apply_balancing_bias_update

    def counting_update():
        updates.append(model.model._expert_load_totals[0].sum().item())
        original()

    model.model.apply_balancing_bias_update = counting_update
    ids = random_ids(16, 16)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[RoutingStatsCallback()])
    trainer.train()
    assert len(updates) == 3, updates
    assert updates == [2 * 2 * 16 * 4] * 3, "each update uses both micro-batches of its step (4 MoE layers)"
    logged = [entry for entry in trainer.state.log_history if "moe/max_violation" in entry]
    assert len(logged) == 3 and all(entry["moe/max_violation"] >= 0 for entry in logged)
    assert (tmp_path / "expert_load.png").stat().st_size > 0


def _train_with_routing_stats(output_dir, max_steps, dataset, resume=None, attach=True, restore=False, **save):
    """`max_steps` steps of the tiny model with a `RoutingStatsCallback` (first in the list with `attach`, as
    `llama4x train` puts it; after transformers' flow callback otherwise); returns its expert-load total."""
    torch.manual_seed(0)
    model = tiny_model(num_experts_per_tok=1).train()
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=max_steps, logging_steps=3,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, restore_callback_states_from_checkpoint=restore,
        **save,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, callbacks=[] if attach else [RoutingStatsCallback()]
    )
    if attach:
        RoutingStatsCallback.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, RoutingStatsCallback)]
    return callback.total_load


def _checkpoint_total(checkpoint) -> torch.Tensor:
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["RoutingStatsCallback"]
    return torch.tensor(saved["attributes"]["total_load"])


@pytest.mark.parametrize("attach, restore", [(True, False), (False, False), (True, True)])
def test_resumed_run_expert_load_counts_the_steps_before_the_checkpoint(tmp_path, attach, restore):
    """A run resumed from a mid-run checkpoint (saved between two training logs) ends with the same expert-load total
    as the uninterrupted run, wherever the callback sits and whether or not the Trainer restores callback states."""
    ids = random_ids(16, 16)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    steps = {"save_strategy": "steps", "save_steps": 4}
    full = _train_with_routing_stats(tmp_path / "full", 7, dataset, attach=attach, restore=restore, **steps)
    _train_with_routing_stats(tmp_path / "cut", 4, dataset, attach=attach, restore=restore, **steps)
    checkpoint = tmp_path / "cut" / "checkpoint-4"  # steps 1-4; the last training log was at step 3
    assert _checkpoint_total(checkpoint).sum() == 4 * 2 * 16 * 4, "4 steps x 2 rows x 16 tokens x 4 MoE layers"
    resumed = _train_with_routing_stats(
        tmp_path / "cut", 7, dataset, resume=str(checkpoint), attach=attach, restore=restore, **steps
    )
    assert full.sum() == 7 * 2 * 16 * 4
    assert torch.equal(resumed.to(full.dtype), full)
    assert (tmp_path / "cut" / "expert_load.png").stat().st_size > 0


def test_an_epoch_checkpoint_counts_every_step_of_the_epoch(tmp_path):
    ids = random_ids(16, 16)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})  # 8 steps per epoch
    _train_with_routing_stats(tmp_path, 8, dataset, save_strategy="epoch")
    assert _checkpoint_total(tmp_path / "checkpoint-8").sum() == 8 * 2 * 16 * 4


def test_resuming_a_checkpoint_without_the_routing_total_counts_from_there(tmp_path):
    """A checkpoint written before the callback kept its state resumes (the Trainer needs the entry to save again);
    the total then counts the resumed steps only."""
    ids = random_ids(16, 16)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    steps = {"save_strategy": "steps", "save_steps": 4}
    _train_with_routing_stats(tmp_path, 4, dataset, **steps)
    state_file = tmp_path / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["RoutingStatsCallback"]
    state_file.write_text(json.dumps(state))
    resumed = _train_with_routing_stats(tmp_path, 9, dataset, resume=str(state_file.parent), **steps)
    assert resumed.sum() == 5 * 2 * 16 * 4
    assert _checkpoint_total(tmp_path / "checkpoint-8").sum() == 4 * 2 * 16 * 4


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.sampled_from([(2, 1), (4, 2), (4, 1), (8, 4)]),
    k_per_group=st.sampled_from([1, 2]),
    with_bias=st.booleans(),
)
def test_group_limited_routing_never_leaves_the_chosen_groups(seed, groups, k_per_group, with_bias):
    n_group, topk_group = groups
    num_experts, k = 16, topk_group * k_per_group
    if k_per_group > num_experts // n_group:
        return
    config = tiny_text_config(
        num_local_experts=num_experts, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        router_bias_update_rate=0.01 if with_bias else 0.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(32, num_experts, generator=generator) * 3
    bias = torch.randn(num_experts, generator=generator) * 0.1 if with_bias else None
    routing = route(logits, config, bias)
    selection = torch.sigmoid(logits) + (bias if with_bias else 0)
    per_group = num_experts // n_group
    for token in range(32):
        group_scores = [
            sorted(selection[token, g * per_group : (g + 1) * per_group].tolist(), reverse=True)[:k_per_group]
            for g in range(n_group)
        ]
        best = sorted(range(n_group), key=lambda g: -sum(group_scores[g]))[:topk_group]
        chosen_groups = {e // per_group for e in routing.topk_index[token].tolist()}
        assert chosen_groups <= set(best), f"token {token}: experts {routing.topk_index[token]} outside groups {best}"
        assert len(set(routing.topk_index[token].tolist())) == k


def test_expert_load_counts_each_assignment_once():
    topk = torch.tensor([[0, 1], [1, 2], [3, 1]])
    assert expert_load(topk, 4, None).tolist() == [1, 3, 1, 1]
    assert expert_load(topk, 4, torch.tensor([True, False, True])).tolist() == [1, 2, 0, 1]


def test_router_jitter_acts_in_training_only():
    model = tiny_model(router_jitter_noise=0.2)
    input_ids = random_ids(1, 12)
    with torch.no_grad():
        evals = [model(input_ids=input_ids, output_router_logits=True).router_logits[0] for _ in range(2)]
        model.train()
        train = model(input_ids=input_ids, output_router_logits=True).router_logits[0]
    assert torch.equal(evals[0], evals[1])
    assert not torch.allclose(train, evals[0])


def test_learned_bias_is_kept_frozen_when_reloaded_with_rate_zero(tmp_path):
    model = tiny_model(router_bias_update_rate=0.01)
    with torch.no_grad():
        for block in model.model.moe_blocks:
            block.e_score_correction_bias.copy_(torch.randn(8))
    model.save_pretrained(tmp_path)
    frozen = AutoModelForCausalLM.from_pretrained(tmp_path, router_bias_update_rate=0.0).eval()
    assert frozen.config.use_router_selection_bias and frozen.config.router_bias_update_rate == 0.0
    input_ids = random_ids(2, 12)
    with torch.no_grad():
        assert torch.allclose(frozen(input_ids=input_ids).logits, model(input_ids=input_ids).logits, atol=1e-6)
    frozen.train()
    optimizer = torch.optim.SGD(frozen.parameters(), lr=0.0)
    frozen(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    for saved, restored in zip(model.model.moe_blocks, frozen.model.moe_blocks):
        assert torch.equal(saved.e_score_correction_bias, restored.e_score_correction_bias), "a frozen bias moved"


def test_bias_starts_at_zero_when_switched_on_for_a_checkpoint_without_one(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, router_bias_update_rate=0.01)
    assert all(torch.equal(b.e_score_correction_bias, torch.zeros(8)) for b in model.model.moe_blocks)


def test_the_balancing_bias_stays_float32_in_half_precision_models():
    """Steps of a small rate would round away in bfloat16 (0.5 + 1e-3 is 0.5 there)."""
    config = tiny_text_config(router_bias_update_rate=1e-3)
    built = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    cast = tiny_model(router_bias_update_rate=1e-3).to(torch.bfloat16)
    halved = tiny_model(router_bias_update_rate=1e-3).half()
    for model in (built, cast, halved):
        assert model.dtype != torch.float32
        block = model.model.moe_blocks[0]
        assert block.e_score_correction_bias.dtype == torch.float32
        block.e_score_correction_bias.fill_(0.5)
        update_balancing_bias(block.e_score_correction_bias, torch.tensor([0.0] + [10.0] * 7), rate=1e-3)
        assert block.e_score_correction_bias[0].item() == pytest.approx(0.501, abs=1e-6)
        assert any(name.endswith("e_score_correction_bias") for name, _ in model.named_buffers())


def test_load_entropy_is_one_for_uniform_loads_and_for_a_single_expert():
    loads = torch.tensor([[5, 5, 5, 5], [20, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(load_entropy(loads), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert load_entropy(torch.tensor([[7], [0]])).tolist() == [1.0, 1.0]
