"""LoRA through PEFT on every part of llama4x (`llama4x.lora_config`): which modules each part reaches, training of
the routed experts' adapters under every experts implementation, hand-computed parameter counts, merge and
save/load equality."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from llama4x import lora_config
from llama4x.moe import Llama4XMoE
from tiny import random_ids, tiny_model

IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]
MIXED = {"moe_layers": [1, 3]}  # layers 0 and 2 dense: every part exists


def lora_model(parts, implementation="eager", seed=0, randomize_b=True, **config_overrides):
    """A tiny model with LoRA on `parts`; lora_B drawn at random (PEFT starts it at zero) so adapters matter."""
    model = tiny_model(seed=seed, **{**MIXED, **config_overrides})
    model.set_experts_implementation(implementation)
    peft_model = get_peft_model(model, lora_config(model, parts=parts, r=4, alpha=8)).eval()
    if randomize_b:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return peft_model


def adapted_names(peft_model) -> set[str]:
    """Names (relative to the CausalLM) of modules wrapped by LoRA, with the parameter name for parameter LoRA."""
    names = set()
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            clean = name.replace(".base_layer", "")
            names.add(f"{clean}.{module.parameter_name}" if hasattr(module, "parameter_name") else clean)
    return names


def expected_names(part: str) -> set[str]:
    per_layer = {
        "attention": lambda i, moe: [f"self_attn.{p}_proj" for p in "qkvo"],
        "dense_ffn": lambda i, moe: [] if moe else [f"feed_forward.{p}_proj" for p in ("gate", "up", "down")],
        "shared_experts": lambda i, moe: (
            [f"feed_forward.shared_experts.{p}_proj" for p in ("gate", "up", "down")] if moe else []
        ),
        "routed_experts": lambda i, moe: (
            ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"] if moe else []
        ),
    }[part]
    return {f"model.layers.{i}.{path}" for i in range(4) for path in per_layer(i, i in MIXED["moe_layers"])}


@pytest.mark.parametrize("part", ["attention", "dense_ffn", "shared_experts", "routed_experts"])
def test_each_part_reaches_exactly_its_modules(part):
    peft_model = lora_model((part,), randomize_b=False)
    assert adapted_names(peft_model) == expected_names(part)


def test_router_part_trains_the_router_in_full():
    peft_model = lora_model(("router", "attention"), randomize_b=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {
        f"base_model.model.model.layers.{i}.feed_forward.router.modules_to_save.default.weight" for i in (1, 3)
    }
    assert adapted_names(peft_model) == expected_names("attention")
    ids = random_ids(2, 12)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    for name, param in peft_model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"router copy {name} got no gradient"


def test_trainable_parameter_count_matches_hand_count():
    peft_model = lora_model(LORA_ALL := ("attention", "shared_experts", "dense_ffn", "routed_experts", "router"))
    config = peft_model.config
    r, H, E, I_moe, I_dense = 4, config.hidden_size, config.num_local_experts, config.moe_intermediate_size, 48
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    linear = lambda fan_in, fan_out: r * (fan_in + fan_out)  # A (r, in) + B (out, r)
    attention = linear(H, q_out) + 2 * linear(H, kv_out) + linear(q_out, H)
    swiglu = lambda width: 2 * linear(H, width) + linear(width, H)
    # Parameter LoRA: per expert a rank-r pair, A (E*r, in) and B (out, E*r).
    experts = E * r * (H + 2 * I_moe) + E * r * (I_moe + H)
    router = E * H  # trained in full
    moe_layer = attention + swiglu(I_moe) + experts + router
    dense_layer = attention + swiglu(I_dense)
    expected = 2 * moe_layer + 2 * dense_layer
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == expected, f"{LORA_ALL}: {trainable} trainable, hand count {expected}"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_routed_expert_lora_trains_and_changes_outputs(implementation):
    torch.manual_seed(0)
    peft_model = lora_model(("routed_experts",), implementation, randomize_b=False)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("feed_forward.experts" in n and "lora_" in n for n in trainable), sorted(trainable)
    frozen_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    ids = random_ids(4, 16)
    peft_model.eval()
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(ids).logits
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    peft_model.train()
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
    for name, param in trainable.items():  # lora_B starts at zero, so lora_A's first gradient is zero; not later
        assert param.grad is not None and param.grad.abs().max() > 0, f"{name}: zero gradient after 3 steps"
        assert not torch.equal(param, start[name]), f"{name}: not updated"
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), f"frozen {name} changed"
    peft_model.eval()
    with torch.no_grad():
        diff = (peft_model(ids).logits - base_logits).abs().max().item()
    assert diff > 1e-4, f"outputs unchanged by the trained expert adapters (max diff {diff})"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_merge_and_unload_matches_adapter_model(implementation):
    peft_model = lora_model(("attention", "shared_experts", "dense_ffn", "routed_experts", "router"), implementation)
    ids = random_ids(2, 16)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert (adapted - base).abs().max() > 1e-3, "adapters had no effect: the test would prove nothing"
    diff = (merged - adapted).abs().max().item()
    assert diff < 1e-5, f"merged vs adapter logits: max diff {diff}"


def test_adapter_save_load_gives_identical_logits(tmp_path):
    parts = ("attention", "shared_experts", "dense_ffn", "routed_experts", "router")
    peft_model = lora_model(parts).eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    base = tiny_model(seed=0, **MIXED)
    base.set_experts_implementation("eager")  # as lora_model's
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        diff = (loaded(ids).logits - expected).abs().max().item()
    assert diff == 0.0, f"reloaded adapter: max diff {diff}"


def balancing_biases(model) -> list[torch.Tensor]:
    return [m.e_score_correction_bias for m in model.modules() if isinstance(m, Llama4XMoE)]


@pytest.mark.parametrize("parts", [("attention", "routed_experts"), ("attention", "router")])
def test_lora_training_leaves_the_balancing_biases_and_the_saved_adapter_reproduces_it(tmp_path, parts):
    """The loss-free balancing biases are base-model buffers an adapter cannot save: under LoRA (PEFT's own
    `get_peft_model`, no llama4x helper) they stay where they were, so save -> load gives the trained model back."""
    rate = {"router_bias_update_rate": 0.01}
    peft_model = lora_model(parts, **rate).train()
    biases = [b.clone() for b in balancing_biases(peft_model)]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ids = random_ids(2, 16, seed=step)
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for before, after in zip(biases, balancing_biases(peft_model)):
        assert torch.equal(before, after)
    ids = random_ids(2, 16, seed=9)
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
    peft_model.save_pretrained(tmp_path)
    base = tiny_model(seed=0, **MIXED, **rate)
    base.set_experts_implementation("eager")  # as lora_model's
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(base, tmp_path).eval()(ids).logits, expected)


def test_full_fine_tuning_moves_the_balancing_biases():
    """The control of the test above: with the routers training, one step moves the biases by +-rate (0 for an
    expert loaded exactly at the mean)."""
    model = tiny_model(router_bias_update_rate=0.01).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    biases = [b.clone() for b in balancing_biases(model)]
    ids = random_ids(2, 16)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for before, after in zip(biases, balancing_biases(model)):
        moved = (after - before).abs()
        assert moved.eq(0.01).any() and (moved.eq(0.01) | moved.eq(0.0)).all()


def test_invalid_lora_arguments_name_the_field():
    model = tiny_model(**MIXED)
    with pytest.raises(ValueError, match="parts"):
        lora_config(model, parts=("experts",))
    with pytest.raises(ValueError, match="dropout"):
        lora_config(model, parts=("routed_experts",), dropout=0.1)
    assert lora_config(model, parts=("attention",), dropout=0.1).lora_dropout == 0.1
    with pytest.raises(ValueError, match="reach no LoRA target"):
        lora_config(tiny_model(), parts=("dense_ffn",))  # every layer is MoE
    with pytest.raises(ValueError, match="reach no LoRA target"):
        lora_config(model, parts=("router",))
    with pytest.raises(ValueError, match="`lora_alpha` as `alpha=`"):
        lora_config(model, parts=("attention",), lora_alpha=32)  # PEFT's name for it
    with pytest.raises(ValueError, match="`lora_dropout` as `dropout=`"):
        lora_config(model, parts=("attention",), lora_dropout=0.1)


def test_one_part_may_be_a_plain_string():
    model = tiny_model(**MIXED)
    assert (
        lora_config(model, parts="attention").target_modules == lora_config(model, parts=("attention",)).target_modules
    )
    with pytest.raises(ValueError, match="`parts`=\\('experts',\\)"):
        lora_config(model, parts="experts")


@pytest.mark.parametrize("option", [{"use_dora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "eva"}])
def test_options_pefts_expert_lora_cannot_apply_are_refused_by_name(option):
    """PEFT refuses DoRA only when wrapping the model, and its weight-based or data-driven initialisations fail on
    the experts module (no `weight`, 3-D inputs); the same options remain fine on the `nn.Linear` parts."""
    model = tiny_model(**MIXED)
    ((name, value),) = option.items()
    with pytest.raises(ValueError, match=f"`{name}`={value!r} with part 'routed_experts'"):
        lora_config(model, parts=("attention", "routed_experts"), **option)
    get_peft_model(model, lora_config(model, parts=("attention",), **option))
