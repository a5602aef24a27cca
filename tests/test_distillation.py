"""Tests for distillation: losses against float64 hand computations, masks, student configs (the llama kind loads
without llama4x), initialisation from the teacher (frequency-merged experts, RoPE permutation, vision), the online and
offline `DistillationTrainer` (images included), the offline cache, and the `llama4x distill` job."""

import json
import math
import re

import pytest
import torch
from transformers import LlamaForCausalLM, TrainingArguments, default_data_collator

from llama4x import Llama4XForCausalLM, Llama4XForConditionalGeneration
from llama4x.distillation import (
    CACHE_META,
    DistillationArguments,
    DistillationTrainer,
    TeacherCache,
    init_student_from_teacher,
    student_config,
)
from llama4x.distillation_cache import prepare_teacher_cache
from llama4x.distillation_losses import HiddenStateAligner, TeacherTopK, distillation_loss
from llama4x.distillation_students import interleaved_to_rotate_half, merged_expert_ffn, select_layers
from tiny import (
    IMAGE_ID,
    random_ids,
    randomize_to_unit_scale,
    run_without_llama4x,
    tiny_model,
    tiny_multimodal_config,
    tiny_multimodal_model,
    tiny_text_config,
)

# ---- losses -------------------------------------------------------------------------------------------------------

B, S, V = 2, 6, 7


def loss_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, V, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(B, S, V, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, S), generator=generator)
    labels[0, :3] = -100  # a prompt
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    labels[1, 4:] = -100
    return student, teacher, labels, mask


def softmax(xs):
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hand_loss(student, teacher, labels, mask, kind, temperature, alpha, beta, top_k):
    """The documented loss, position by position in Python floats (float64)."""
    student, teacher, labels, mask = student.tolist(), teacher.tolist(), labels.tolist(), mask.tolist()
    kd_total = ce_total = count = 0
    for b in range(B):
        for t in range(S - 1):
            if labels[b][t + 1] == -100 or not (mask[b][t] and mask[b][t + 1]):
                continue
            count += 1
            p = softmax([x / temperature for x in teacher[b][t]])
            q = softmax([x / temperature for x in student[b][t]])
            if kind == "forward_kl":
                kd = kl(p, q)
            elif kind == "reverse_kl":
                kd = kl(q, p)
            elif kind == "jsd":
                m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
                kd = beta * kl(p, m) + (1 - beta) * kl(q, m)
            else:
                top = sorted(range(V), key=lambda v: -teacher[b][t][v])[:top_k]
                p_top = softmax([teacher[b][t][v] / temperature for v in top])
                kd = sum(pk * math.log(pk / q[v]) for pk, v in zip(p_top, top))
            kd_total += kd
            ce_total -= math.log(softmax(student[b][t])[labels[b][t + 1]])
    return alpha * temperature**2 * kd_total / count + (1 - alpha) * ce_total / count


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "topk_kl"])
@pytest.mark.parametrize("temperature, alpha, beta", [(1.0, 1.0, 0.5), (2.0, 0.7, 0.3)])
def test_each_loss_equals_a_float64_hand_computation(kind, temperature, alpha, beta):
    student, teacher, labels, mask = loss_inputs()
    args = {"kind": kind, "temperature": temperature, "alpha": alpha, "beta": beta, "top_k": 3}
    actual = distillation_loss(student, teacher, labels, mask, **args).item()
    expected = hand_loss(student, teacher, labels, mask, **args)
    assert abs(actual - expected) < 1e-12, f"{kind}: {actual} vs {expected}, diff {abs(actual - expected)}"


def test_forward_kl_of_identical_distributions_is_zero():
    student, _, labels, mask = loss_inputs()
    for kind in ("forward_kl", "reverse_kl", "jsd", "topk_kl"):
        loss = distillation_loss(student, student.clone(), labels, mask, kind=kind, top_k=V).item()
        assert abs(loss) < 1e-12, f"{kind}: {loss}"


def test_topk_kl_with_k_equal_to_the_vocabulary_is_forward_kl():
    student, teacher, labels, mask = loss_inputs(1)
    full = distillation_loss(student, teacher, labels, mask, kind="forward_kl", temperature=1.5)
    topk = distillation_loss(student, teacher, labels, mask, kind="topk_kl", temperature=1.5, top_k=V)
    assert abs(full.item() - topk.item()) < 1e-12, (full.item(), topk.item())


def test_masked_positions_neither_change_the_loss_nor_get_gradients():
    student, teacher, labels, mask = loss_inputs(2)
    student.requires_grad_(True)
    loss = distillation_loss(student, teacher, labels, mask, alpha=0.5)
    loss.backward()
    # Position t is counted iff labels[t + 1] != -100 and mask[t] = mask[t + 1] = 1: rows 0 (prompt 0..2) and 1 (pad).
    uncounted = [(0, 0), (0, 1), (1, 3), (1, 4), (1, 5), (0, 5)]
    for b, t in uncounted:
        assert student.grad[b, t].abs().max() == 0, f"position {(b, t)} got a gradient"
    changed = student.detach().clone()
    for b, t in uncounted:
        changed[b, t] = torch.randn(V, dtype=torch.float64) * 10
    teacher_changed = teacher.clone()
    teacher_changed[1, 4:] = 5.0
    again = distillation_loss(changed, teacher_changed, labels, mask, alpha=0.5)
    assert abs(loss.item() - again.item()) < 1e-12


def test_a_teacher_top_k_with_the_whole_vocabulary_equals_the_dense_teacher():
    student, teacher, labels, mask = loss_inputs(3)
    top = teacher.topk(V, dim=-1)
    sparse = TeacherTopK(top.values, top.indices)
    for kind in ("forward_kl", "reverse_kl", "jsd", "topk_kl"):
        dense = distillation_loss(student, teacher, labels, mask, kind=kind, top_k=4, temperature=2.0).item()
        cached = distillation_loss(student, sparse, labels, mask, kind=kind, top_k=4, temperature=2.0).item()
        assert abs(dense - cached) < 1e-12, f"{kind}: {dense} vs {cached}"


def test_full_distribution_losses_refuse_a_truncated_teacher():
    student, teacher, labels, mask = loss_inputs()
    top = teacher.topk(3, dim=-1)
    with pytest.raises(ValueError, match="top 3 of 7 logits"):
        distillation_loss(student, TeacherTopK(top.values, top.indices), labels, mask, kind="reverse_kl")
    with pytest.raises(ValueError, match="exceeds the 3 teacher logits"):
        distillation_loss(student, TeacherTopK(top.values, top.indices), labels, mask, kind="topk_kl", top_k=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "kl"}, "Invalid distillation loss `kind`='kl'"),
        ({"temperature": 0.0}, "Invalid `temperature`=0.0"),
        ({"temperature": float("inf")}, "Invalid `temperature`=inf"),
        ({"alpha": 1.5}, "Invalid `alpha`=1.5"),
        ({"kind": "jsd", "beta": 1.0}, "Invalid `beta`=1.0"),
        ({"kind": "topk_kl", "top_k": 0}, "Invalid `top_k`=0"),
    ],
)
def test_invalid_loss_arguments_raise_value_errors_naming_them(kwargs, message):
    student, teacher, labels, mask = loss_inputs()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        distillation_loss(student, teacher, labels, mask, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_weight": float("nan")}, "Invalid `hidden_weight`=nan: expected a finite weight >= 0"),
        ({"cache_batch_size": 0}, "Invalid `cache_batch_size`=0"),
        ({"cache_batch_size": -1}, "Invalid `cache_batch_size`=-1"),
        ({"teacher_device": "gpu"}, "--teacher-device 'gpu': expected cpu, cuda or cuda:N"),
    ],
)
def test_invalid_distillation_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DistillationArguments(**kwargs)


def test_hidden_state_alignment_is_the_masked_mse_with_a_projection_only_when_widths_differ():
    student, _, labels, mask = loss_inputs()
    generator = torch.Generator().manual_seed(4)
    h_s, h_t = (torch.randn(B, S, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    aligner = HiddenStateAligner(5, 5)
    assert not list(aligner.parameters())
    valid = (labels[:, 1:] != -100) & mask[:, 1:].bool() & mask[:, :-1].bool()
    expected = ((h_s[:, :-1] - h_t[:, :-1]) ** 2).mean(-1)[valid].mean()
    actual = aligner([h_s], [h_t], labels, mask)
    assert abs(actual.item() - expected.item()) < 1e-6
    wide = HiddenStateAligner(5, 9).double()
    teacher_wide = torch.randn(B, S, 9, dtype=torch.float64)
    wide([h_s], [teacher_wide], labels, mask).backward()
    assert wide.projections[0].weight.grad.abs().sum() > 0


# ---- student configs ----------------------------------------------------------------------------------------------


def test_layer_selection_is_evenly_spaced_or_explicit_and_validated():
    assert select_layers(8, 4) == [0, 2, 5, 7]
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(4) == [0, 1, 2, 3]
    assert select_layers(4, layers=[1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="expected 1 to 4"):
        select_layers(4, 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        select_layers(4, layers=[2, 1])


def test_llama4x_student_has_no_moe_layers_and_keeps_the_attention_pattern_of_its_layers():
    teacher = tiny_text_config(use_qk_norm="rms")
    config = student_config(teacher, "llama4x", num_layers=2)
    assert config.moe_layers == [] and Llama4XForCausalLM(config).model.moe_blocks == []
    assert config.num_hidden_layers == 2 and config.distillation == {"teacher_layers": [0, 3]}
    assert config.layer_types == ["chunked_attention", "full_attention"] and config.nope_layers == [1]
    assert config.use_qk_norm == "rms" and config.attention_chunk_size == teacher.attention_chunk_size
    assert config.intermediate_size == (2 + 1) * 16, "default FFN width: (top-k + shared) * moe_intermediate_size"
    composite = student_config(tiny_multimodal_config(), "llama4x", layers=[1, 2], intermediate_size=40)
    assert composite.vision_config.to_dict() == tiny_multimodal_config().vision_config.to_dict()
    assert composite.image_token_id == IMAGE_ID and composite.text_config.intermediate_size == 40
    assert composite.text_config.layer_types == ["full_attention", "chunked_attention"]


def test_llama_student_saves_and_loads_with_transformers_alone(tmp_path):
    teacher = tiny_model()
    config = student_config(teacher.config, "llama", num_layers=3)
    assert config.model_type == "llama" and config.num_hidden_layers == 3
    torch.manual_seed(0)
    student = LlamaForCausalLM(config).eval()
    init_student_from_teacher(student, teacher)
    student.save_pretrained(tmp_path)
    input_ids = random_ids(1, 10)
    with torch.no_grad():
        expected = student(input_ids).logits
    torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / "data.pt")
    stdout = run_without_llama4x(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
        data = torch.load({str(tmp_path / "data.pt")!r})
        with torch.no_grad():
            diff = (model(data["input_ids"]).logits - data["expected"]).abs().max().item()
        assert diff <= 1e-6, diff
        assert "llama4x" not in sys.modules
        print("PLAIN-OK", type(model).__name__)
        """
    )
    assert "PLAIN-OK LlamaForCausalLM" in stdout


# ---- initialisation -----------------------------------------------------------------------------------------------

EXPERT = 3


def one_expert_teacher(**overrides) -> Llama4XForCausalLM:
    """A top-1 teacher whose selection bias sends every token to expert 3, with combine weight 1 (renormalised)."""
    fields = {"num_experts_per_tok": 1, "norm_topk_prob": True, "router_bias_update_rate": 1e-3, **overrides}
    teacher = tiny_model(**fields)
    randomize_to_unit_scale(teacher, 1)
    with torch.no_grad():
        for block in teacher.model.moe_blocks:
            block.e_score_correction_bias[EXPERT] = 10.0
    return teacher


def test_student_ffn_equals_the_teacher_moe_for_tokens_routed_to_the_one_expert_calibration_saw():
    teacher = one_expert_teacher()
    student = Llama4XForCausalLM(student_config(teacher.config)).eval()
    calibration = [{"input_ids": random_ids(2, 12, seed=1), "attention_mask": torch.ones(2, 12)}]
    info = init_student_from_teacher(student, teacher, calibration)
    assert info["ffn_init"] == ["merged experts"] * 4
    assert all(counts[EXPERT] == 24 and sum(counts) == 24 for counts in info["expert_counts"].values())
    x = 0.25 * torch.randn(5, 7, 32)  # outputs O(1), where 1e-5 is float32 rounding and more
    with torch.no_grad():
        for i, layer in enumerate(student.model.layers):
            moe_out, _, topk_index = teacher.model.layers[i].feed_forward(x)
            assert (topk_index == EXPERT).all()
            diff = (layer.feed_forward(x) - moe_out).abs().max().item()
            assert diff < 1e-5, f"layer {i}: max diff {diff}"
        input_ids = random_ids(2, 20, seed=2)
        diff = (student(input_ids).logits - teacher(input_ids).logits).abs().max().item()
    assert diff < 1e-4, f"whole model: max diff {diff}"


def test_routing_counts_go_to_their_own_layer_whatever_the_order_of_moe_layers():
    teacher = one_expert_teacher(moe_layers=[3, 1])  # valid config: the MoE layers in any order
    with torch.no_grad():
        teacher.model.layers[1].feed_forward.e_score_correction_bias[EXPERT] = 0.0
        teacher.model.layers[1].feed_forward.e_score_correction_bias[5] = 10.0  # layer 1: expert 5, layer 3: EXPERT
    student = Llama4XForCausalLM(student_config(teacher.config))
    calibration = [{"input_ids": random_ids(2, 12, seed=1), "attention_mask": torch.ones(2, 12)}]
    counts = init_student_from_teacher(student, teacher, calibration)["expert_counts"]
    assert counts[1][5] == 24 and counts[3][EXPERT] == 24, counts


def test_merged_experts_are_the_documented_frequency_weighted_average_per_group():
    teacher = tiny_model(num_experts_per_tok=2, router_weight_on_input=True)
    randomize_to_unit_scale(teacher, 3)
    block = teacher.model.moe_blocks[0]
    counts = torch.tensor([6.0, 1, 0, 3, 0, 0, 2, 0], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.2, 1, 0.9, 1, 1, 0.4, 1], dtype=torch.float64)
    gate, up, down = merged_expert_ffn(block, {"counts": counts, "weight_sums": counts * weights})
    # Most-used first into the emptiest group (ties: fewer members): {0, 2, 4, 5} (6) and {1, 3, 6, 7} (1 + 3 + 2).
    gate_up, down_proj = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    width = 16
    group = [1, 3, 6, 7]
    share = counts[group] / counts[group].sum()
    expected_gate = sum(share[n] * weights[e] * gate_up[e, :width] for n, e in enumerate(group))
    expected_up = sum(share[n] * weights[e] * gate_up[e, width:] for n, e in enumerate(group))
    expected_down = sum(share[n] * down_proj[e] for n, e in enumerate(group))
    assert gate.shape == (3 * width, 32) and down.shape == (32, 3 * width)
    assert torch.equal(gate[:width], block.shared_experts.gate_proj.weight.double())
    assert torch.equal(down[:, :width], block.shared_experts.down_proj.weight.double())
    assert torch.allclose(gate[width : 2 * width], 0.5 * gate_up[0, :width])
    assert torch.allclose(up[width : 2 * width], 0.5 * gate_up[0, width:])
    assert torch.allclose(down[:, width : 2 * width], down_proj[0])
    assert torch.allclose(gate[2 * width :], expected_gate) and torch.allclose(up[2 * width :], expected_up)
    assert torch.allclose(down[:, 2 * width :], expected_down)


def test_rope_permutation_makes_a_llama_student_reproduce_a_rope_only_dense_teacher():
    teacher = tiny_model(interleave_moe_layer_step=0, use_qk_norm="none", no_rope_layer_interval=0,
                         attention_chunk_size=None)  # fmt: skip
    randomize_to_unit_scale(teacher, 5)
    student = LlamaForCausalLM(student_config(teacher.config, "llama")).eval()
    info = init_student_from_teacher(student, teacher)
    assert info["ffn_init"] == ["copied"] * 4
    input_ids = random_ids(2, 16)
    with torch.no_grad():
        diff = (student(input_ids).logits - teacher(input_ids).logits).abs().max().item()
    assert diff < 1e-4, f"max diff {diff}"
    weight = teacher.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(interleaved_to_rotate_half(weight, 8), weight), "the permutation must move rows"


def test_multimodal_student_copies_the_vision_front_end_and_reproduces_the_teacher_with_images():
    teacher = tiny_multimodal_model(num_experts_per_tok=1, norm_topk_prob=True, router_bias_update_rate=1e-3)
    with torch.no_grad():
        for block in teacher.model.language_model.moe_blocks:
            block.e_score_correction_bias[EXPERT] = 10.0
    student = Llama4XForConditionalGeneration(student_config(teacher.config)).eval()
    input_ids, pixel_values = image_batch()
    info = init_student_from_teacher(student, teacher, [{"input_ids": input_ids, "pixel_values": pixel_values}])
    assert info["vision_copied"]
    with torch.no_grad():
        diff = (student(input_ids=input_ids, pixel_values=pixel_values).logits
                - teacher(input_ids=input_ids, pixel_values=pixel_values).logits).abs().max().item()  # fmt: skip
    assert diff < 1e-5, f"max diff {diff}"


def test_vocabulary_mismatch_is_a_value_error_naming_both_sizes(tmp_path):
    teacher = tiny_model()
    student = Llama4XForCausalLM(tiny_text_config(vocab_size=50, moe_layers=[]))
    with pytest.raises(ValueError, match="Teacher vocab_size=97 but student vocab_size=50"):
        init_student_from_teacher(student, teacher)
    with pytest.raises(ValueError, match="Teacher vocab_size=97 but student vocab_size=50"):
        DistillationTrainer(model=student, teacher=teacher, args=training_args(tmp_path, 1), train_dataset=text_rows())


def test_a_different_width_rules_out_copying_and_names_the_field():
    teacher = tiny_model()
    student = Llama4XForCausalLM(student_config(teacher.config, hidden_size=48))
    with pytest.raises(ValueError, match="student hidden_size=48, teacher hidden_size=32"):
        init_student_from_teacher(student, teacher)


# ---- trainer ------------------------------------------------------------------------------------------------------


def image_batch(batch: int = 2, text: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `text` ids, one image (4 placeholder tokens of one tile), `text` ids; and the tiles."""
    ids = random_ids(batch, 2 * text, seed=seed, vocab=97)
    ids[ids == IMAGE_ID] = 7
    placeholders = torch.full((batch, 4), IMAGE_ID)
    input_ids = torch.cat([ids[:, :text], placeholders, ids[:, text:]], dim=1)
    return input_ids, torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def text_rows(count: int = 16, length: int = 12) -> list[dict]:
    ids = random_ids(count, length, seed=7)
    labels = ids.clone()
    labels[:, :3] = -100  # prompts
    return [{"input_ids": i, "attention_mask": torch.ones(length, dtype=torch.long), "labels": lab}
            for i, lab in zip(ids, labels)]  # fmt: skip


def image_rows(count: int = 8) -> list[dict]:
    input_ids, pixel_values = image_batch(count, seed=3)
    labels = input_ids.masked_fill(input_ids == IMAGE_ID, -100)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab, "pixel_values": p[None]}
            for i, lab, p in zip(input_ids, labels, pixel_values)]  # fmt: skip


def collate_images(rows: list[dict]) -> dict:
    batch = default_data_collator([{k: v for k, v in row.items() if k != "pixel_values"} for row in rows])
    return {**batch, "pixel_values": torch.cat([row["pixel_values"] for row in rows])}


def training_args(tmp_path, steps: int, **overrides) -> TrainingArguments:
    fields = {"output_dir": str(tmp_path / "run"), "max_steps": steps, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
              "use_cpu": True, "disable_tqdm": True, "remove_unused_columns": False, "seed": 0, **overrides}  # fmt: skip
    return TrainingArguments(**fields)


@torch.no_grad()
def kl_to_teacher(student, teacher, batch) -> float:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    return distillation_loss(student(**inputs).logits, teacher(**inputs).logits, batch["labels"]).item()


def unit_teacher(**overrides):
    teacher = tiny_model(**overrides)
    randomize_to_unit_scale(teacher, 11)
    return teacher


def random_student(teacher, **kwargs):
    torch.manual_seed(1)
    config = student_config(teacher.config, **kwargs)
    return Llama4XForCausalLM(config) if config.model_type != "llama" else LlamaForCausalLM(config)


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_trainer_lowers_the_students_kl_to_the_teacher(tmp_path, offline):
    teacher, rows = unit_teacher(), text_rows()
    student = random_student(teacher, num_layers=2)
    batch = default_data_collator(rows[:8])
    before = kl_to_teacher(student, teacher, batch)
    dargs = DistillationArguments(alpha=1.0, offline=offline)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_args=dargs,
                                  args=training_args(tmp_path, 12), train_dataset=rows)  # fmt: skip
    trainer.train()
    after = kl_to_teacher(student, teacher, batch)
    assert after < 0.9 * before, (before, after)
    assert teacher.training is False and not any(p.requires_grad for p in teacher.parameters())
    assert "kd_loss" in trainer.state.log_history[0]


def test_gradient_accumulation_matches_one_big_batch_when_rows_supervise_different_counts(tmp_path):
    teacher, rows = unit_teacher(), text_rows(count=8)
    for n, row in enumerate(rows):  # prompts of 1, 3, 5, 7 tokens: micro-batches count different positions
        row["labels"] = row["labels"].clone()
        row["labels"][: 1 + 2 * (n % 4)] = -100
    results = {}
    for name, batching in (("big", {"per_device_train_batch_size": 4}),
                           ("accumulated", {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})):  # fmt: skip
        student = random_student(teacher, num_layers=2)
        args = training_args(tmp_path / name, 1, optim="sgd", learning_rate=1.0, max_grad_norm=0, **batching)
        trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=rows,
                                      distillation_args=DistillationArguments(alpha=0.5))  # fmt: skip
        trainer.train()
        results[name] = trainer.state.log_history[0]["loss"], torch.cat([p.flatten() for p in student.parameters()])
    (big_loss, big), (loss, accumulated) = results["big"], results["accumulated"]
    assert loss == pytest.approx(big_loss, rel=1e-6), (loss, big_loss)
    diff = (accumulated - big).abs().max().item()
    assert diff < 1e-5, f"parameters after one step differ by {diff}"


def test_offline_cache_files_exist_and_give_the_online_first_step_loss(tmp_path):
    teacher, rows = unit_teacher(), text_rows()
    first_losses = {}
    for offline in (False, True):
        student = random_student(teacher, kind="llama", num_layers=2)
        dargs = DistillationArguments(alpha=0.6, temperature=2.0, offline=offline, cache_dir=str(tmp_path / "cache"))
        trainer = DistillationTrainer(model=student, teacher=teacher, distillation_args=dargs,
                                      args=training_args(tmp_path / str(offline), 1), train_dataset=rows)  # fmt: skip
        trainer.train()
        first_losses[offline] = trainer.state.log_history[0]["loss"]
    meta = json.loads((tmp_path / "cache" / CACHE_META).read_text())
    assert meta["top_k"] == 97 and meta["num_rows"] == 16  # full distribution for forward_kl
    assert all((tmp_path / "cache" / shard["file"]).is_file() for shard in meta["shards"])
    values, indices = TeacherCache(tmp_path / "cache")[5]
    with torch.no_grad():  # the cache's first batch of 8 rows, as the teacher pass saw it
        expected = teacher(default_data_collator(rows[:8])["input_ids"]).logits[5]
    assert torch.equal(values, expected.sort(-1, descending=True).values)
    assert torch.equal(expected.gather(-1, indices), values)
    assert abs(first_losses[True] - first_losses[False]) < 1e-5 * first_losses[False], first_losses


def test_offline_top_k_cache_stores_k_logits_and_is_reused_only_for_the_same_data_and_teacher(tmp_path):
    teacher, rows = unit_teacher(), text_rows()
    dargs = DistillationArguments(loss="topk_kl", top_k=5, offline=True, cache_dir=str(tmp_path / "cache"))
    DistillationTrainer(model=random_student(teacher), teacher=teacher, distillation_args=dargs,
                        args=training_args(tmp_path, 2), train_dataset=rows).train()  # fmt: skip
    assert json.loads((tmp_path / "cache" / CACHE_META).read_text())["top_k"] == 5
    # Same data and settings: no teacher needed any more.
    trainer = DistillationTrainer(model=random_student(teacher), teacher=None, distillation_args=dargs,
                                  args=training_args(tmp_path, 2), train_dataset=rows)  # fmt: skip
    trainer.train()
    # Another teacher: rebuilt.
    built = json.loads((tmp_path / "cache" / CACHE_META).read_text())["teacher_fingerprint"]
    other = tiny_model(seed=1)
    DistillationTrainer(model=random_student(teacher), teacher=other, distillation_args=dargs,
                        args=training_args(tmp_path, 1), train_dataset=rows)  # fmt: skip
    assert json.loads((tmp_path / "cache" / CACHE_META).read_text())["teacher_fingerprint"] != built
    with pytest.raises(ValueError, match="no teacher to build one"):
        DistillationTrainer(model=random_student(teacher), teacher=None, distillation_args=dargs,
                            args=training_args(tmp_path, 2), train_dataset=text_rows(count=8))  # fmt: skip


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_multimodal_distillation_trains_with_images_in_the_batch(tmp_path, offline):
    teacher = tiny_multimodal_model()
    randomize_to_unit_scale(teacher, 2)
    torch.manual_seed(1)
    student = Llama4XForConditionalGeneration(student_config(teacher.config, num_layers=2))
    rows = image_rows()
    batch = collate_images(rows[:4])
    before = kl_to_teacher(student, teacher, batch)
    dargs = DistillationArguments(alpha=1.0, offline=offline)
    DistillationTrainer(model=student, teacher=teacher, distillation_args=dargs, args=training_args(tmp_path, 10),
                        train_dataset=rows, data_collator=collate_images).train()  # fmt: skip
    after = kl_to_teacher(student, teacher, batch)
    assert after < 0.8 * before, (before, after)


def test_hidden_state_alignment_trains_the_projection_of_a_narrower_student(tmp_path):
    teacher, rows = unit_teacher(), text_rows()
    student = random_student(teacher, hidden_size=24, layers=[0, 3])
    dargs = DistillationArguments(alpha=1.0, hidden_weight=1.0, hidden_layers="mapped")
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_args=dargs,
                                  args=training_args(tmp_path, 3), train_dataset=rows)  # fmt: skip
    assert trainer.aligner.pairs == [(1, 1), (-1, -1)]
    before = [p.detach().clone() for p in trainer.aligner.parameters()]
    trainer.train()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.aligner.parameters()))
    assert "hidden_loss" in trainer.state.log_history[0]


def test_labels_only_training_needs_no_teacher_and_online_distillation_does(tmp_path):
    teacher, rows = unit_teacher(), text_rows()
    trainer = DistillationTrainer(model=random_student(teacher), distillation_args=DistillationArguments(alpha=0.0),
                                  args=training_args(tmp_path, 1), train_dataset=rows)  # fmt: skip
    trainer.train()
    assert trainer.state.log_history[0]["kd_loss"] == 0.0
    with pytest.raises(ValueError, match="needs a `teacher`"):
        DistillationTrainer(model=random_student(teacher), args=training_args(tmp_path, 1), train_dataset=rows)
    with pytest.raises(ValueError, match="online distillation"):
        DistillationArguments(offline=True, hidden_weight=1.0)


# ---- the job ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_teacher_dir(tmp_path_factory):
    from llama4x.data import python_docs_texts
    from llama4x.tokenization import train_tokenizer

    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = train_tokenizer(python_docs_texts()[:3], vocab_size=300)
    config = tiny_text_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    Llama4XForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_distill_command_writes_the_student_the_baseline_and_the_report(text_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from llama4x.cli import main

    out = tmp_path / "out"
    status = main(["distill", "--teacher", str(text_teacher_dir), "--out", str(out), "--student-kind", "llama",
                   "--layers", "2", "--steps", "2", "--batch-size", "2", "--block-size", "16", "--eval-size", "2",
                   "--calibration-batches", "1", "--loss", "jsd", "--temperature", "2"])  # fmt: skip
    assert status == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "distillation_report.md",
                 "distillation_report.json", "labels_only/model.safetensors"):  # fmt: skip
        assert (out / name).is_file(), f"{name} missing"
    assert (out / "distillation_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "distillation_report.json").read_text())
    assert set(report["models"]) == {"teacher", "distilled", "labels_only"}
    teacher, distilled = report["models"]["teacher"], report["models"]["distilled"]
    assert distilled["parameters"] < teacher["parameters"] and teacher["active_parameters"] < teacher["parameters"]
    assert distilled["active_parameters"] == distilled["parameters"]
    assert report["settings"]["loss"] == "jsd" and report["teacher_layers"] == [0, 3]
    assert all(m["perplexity"] > 1 and m["decode_tokens_per_second"] > 0 for m in report["models"].values())
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), LlamaForCausalLM)


@pytest.mark.parametrize(
    "eval_fraction, seen, checkpoint",
    [(0.0, 8, False), (0.05, 4, False), (0.097, None, False), (0.1, None, False), (0.2, None, False), (0.0, 8, True)],
)
def test_distill_refuses_a_teacher_trained_on_the_docs_it_holds_out(tmp_path, eval_fraction, seen, checkpoint):
    """A teacher from `llama4x train --dataset pydocs` that held out fewer documents trained on some of the 8 that
    `distill` evaluates on; one holding out the same 8 (0.097 of 78 documents rounds to 8 too) or more, on none.
    A `checkpoint-N` folder is checked against its run's record."""
    from llama4x.distillation import distill
    from llama4x.training import main as train_main

    run = tmp_path / "teacher"
    saving = ["--save_strategy", "steps", "--save_steps", "1"] if checkpoint else ["--save_strategy", "no"]
    train_main(["--preset", "tiny", "--dataset", "pydocs", "--eval_fraction", str(eval_fraction), "--max_steps", "1",
                "--per_device_train_batch_size", "1", "--block_size", "32", "--tokenizer_vocab_size", "300",
                "--output_dir", str(run), "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
                "--eval_strategy", "no", *saving])  # fmt: skip
    teacher = run / "checkpoint-1" if checkpoint else run
    job = dict(student_kind="llama", layers=1, steps=1, batch_size=1, block_size=16, eval_size=1,
               calibration_batches=1, baseline=False)  # fmt: skip
    if seen is None:
        distill(teacher, tmp_path / "out", **job)
        assert (tmp_path / "out" / "distillation_report.json").is_file()
    else:
        with pytest.raises(ValueError, match=f"trained on {seen} of the 8 documents that distill holds out.*"
                                             f"--eval_fraction {eval_fraction}"):  # fmt: skip
            distill(teacher, tmp_path / "out", **job)


def test_calibration_stops_where_the_rows_run_out_and_a_negative_count_is_refused(text_teacher_dir, tmp_path):
    from llama4x.distillation import collated_batches, distill

    rows = [{"input_ids": torch.full((3,), i)} for i in range(5)]
    batches = collated_batches(rows, default_data_collator, batch_size=2, limit=10)  # more batches than rows
    assert [b["input_ids"][:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert len(collated_batches(rows, default_data_collator, batch_size=2, limit=1)) == 1
    with pytest.raises(ValueError, match="calibration_batches=-1"):
        distill(text_teacher_dir, tmp_path / "out", calibration_batches=-1)
    with pytest.raises(ValueError, match="block_size=1: expected an integer >= 2"):  # no next token to predict
        distill(text_teacher_dir, tmp_path / "out", block_size=1)


def test_distill_refuses_an_out_folder_that_is_or_holds_the_teacher(text_teacher_dir):
    from llama4x.distillation import distill

    before = {f.name: f.read_bytes() for f in text_teacher_dir.iterdir() if f.is_file()}
    for out in (text_teacher_dir, text_teacher_dir.parent):
        with pytest.raises(ValueError, match="--out .* must not be the --teacher folder .* or contain it"):
            distill(text_teacher_dir, out, steps=1)
    assert {f.name: f.read_bytes() for f in text_teacher_dir.iterdir() if f.is_file()} == before


def test_distill_passes_callbacks_to_the_trainer_of_each_student(text_teacher_dir, tmp_path):
    from transformers import TrainerCallback

    from llama4x.distillation import distill

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((args.output_dir, state.global_step))

    recorder = StepRecorder()
    distill(text_teacher_dir, tmp_path / "out", student_kind="llama", layers=2, steps=2, batch_size=2, block_size=16,
            eval_size=2, calibration_batches=1, callbacks=[recorder])  # fmt: skip
    runs = tmp_path / "out" / "runs"
    assert recorder.steps == [(str(runs / name), step) for name in ("distilled", "labels_only") for step in (1, 2)]


def test_distill_job_on_a_multimodal_teacher_distills_with_images_and_reports_digits_accuracy(tmp_path):
    from llama4x import Llama4XConfig, Llama4XImageProcessor, Llama4XProcessor
    from llama4x.configuration_llama4x import SPECIAL_TOKEN_PRESETS
    from llama4x.data import DIGITS_QUESTION, python_docs_texts
    from llama4x.distillation import distill
    from llama4x.tokenization import train_tokenizer

    tokenizer = train_tokenizer(python_docs_texts()[:2] + [DIGITS_QUESTION, "0 1 2 3 4 5 6 7 8 9"], vocab_size=300)
    text = tiny_text_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    vision = tiny_multimodal_config().vision_config
    config = Llama4XConfig(text_config=text, vision_config=vision, **SPECIAL_TOKEN_PRESETS["tiny"])
    processor = Llama4XProcessor(Llama4XImageProcessor(size=32, max_patches=1), tokenizer, patch_size=8)
    torch.manual_seed(0)
    Llama4XForConditionalGeneration(config).save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(tmp_path / "teacher")

    report = distill(tmp_path / "teacher", tmp_path / "out", layers=2, steps=2, batch_size=2, eval_size=4,
                     calibration_batches=1, distillation_args=DistillationArguments(loss="topk_kl", top_k=8))  # fmt: skip
    assert report["settings"]["dataset"] == "digits" and report["init"]["vision_copied"]
    for name in ("teacher", "distilled", "labels_only"):
        assert 0.0 <= report["models"][name]["digits_accuracy"] <= 1.0
    student = Llama4XForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert student.config.text_config.moe_layers == [] and student.config.text_config.num_hidden_layers == 2
    assert (tmp_path / "out" / "processor_config.json").is_file() or (tmp_path / "out" / "tokenizer.json").is_file()


# ---- the offline distillation cache (llama4x.distillation_cache) ---------------------------------------------------


def _cache_rows(rows: list[list[int]], length: int = 4) -> list[dict]:
    """Text rows of the given token ids, right-padded with 0 to `length`."""
    return [{"input_ids": torch.tensor(ids + [0] * (length - len(ids))),
             "attention_mask": torch.tensor([1] * len(ids) + [0] * (length - len(ids)))} for ids in rows]  # fmt: skip


def _cached_logits_are_the_teachers(cache, teacher, rows: list[dict]) -> None:
    batch = default_data_collator(rows)
    with torch.no_grad():
        logits = teacher(**batch).logits
    for row, mask in enumerate(batch["attention_mask"]):
        values, _ = cache[row]
        expected = logits[row, mask.bool()].topk(values.shape[-1], dim=-1).values
        assert values.shape == expected.shape, (
            f"row {row}: cached {tuple(values.shape)}, wanted {tuple(expected.shape)}"
        )
        diff = (values - expected).abs().max().item()
        assert diff < 1e-5, f"row {row}: cached logits differ from the teacher's by {diff}"


def test_teacher_cache_is_rebuilt_for_a_teacher_with_other_balancing_biases(tmp_path):
    teacher, rows = tiny_model(router_bias_update_rate=1e-3), _cache_rows([[5, 6, 7], [9, 10]])
    prepare_teacher_cache(teacher, rows, default_data_collator, tmp_path, top_k=5, vocab_size=97)
    biases = [b for name, b in teacher.named_buffers() if name.endswith("e_score_correction_bias")]
    for bias in biases:  # same weights, other routing: other logits
        bias.copy_(torch.linspace(-1.0, 1.0, bias.numel()))
    cache = prepare_teacher_cache(teacher, rows, default_data_collator, tmp_path, top_k=5, vocab_size=97)
    _cached_logits_are_the_teachers(cache, teacher, rows)


def test_teacher_cache_is_rebuilt_for_the_same_tokens_cut_into_other_rows(tmp_path):
    teacher = tiny_model()
    prepare_teacher_cache(teacher, _cache_rows([[5, 6, 7], [9]]), default_data_collator, tmp_path, 5, 97)
    rows = _cache_rows([[5, 6], [7, 9]])
    cache = prepare_teacher_cache(teacher, rows, default_data_collator, tmp_path, top_k=5, vocab_size=97)
    _cached_logits_are_the_teachers(cache, teacher, rows)
