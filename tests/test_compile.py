"""`torch.compile(fullgraph=True)` over the whole training forward: the MoE, the balancing losses, the expert loads,
the loss-free bias bookkeeping and the padding mask compile without a graph break and train like the eager model."""

import copy

import pytest
import torch
import transformers
from packaging.version import Version

from tiny import random_ids, tiny_model

BALANCING = {"router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001, "router_bias_update_rate": 0.01}

# float32 experts run through transformers' grouped-GEMM fallback (torch's grouped GEMM compiles in bfloat16 only);
# before 5.23 that fallback's backward is traced, and torch.compile cannot trace its data-dependent loop.
needs_compilable_fallback = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.23"),
    reason="float32 experts under torch.compile need transformers >= 5.23 (an opaque backward for its grouped-GEMM "
    "fallback); test_compiled_bfloat16_training_matches_eager covers older versions",
)


def _batch(padded: bool) -> dict[str, torch.Tensor]:
    """Two 20-token rows (2.5 chunks of 8); with `padded` the second is left-padded by 5. The labels skip the padding
    and the first real token, which the last padding position predicts (padding rows are garbage by design, and
    compiled and eager attention fill them differently: dense mask vs blockwise chunks)."""
    input_ids = random_ids(2, 20, seed=7)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    if padded:
        attention_mask[1, :5], labels[1, :6] = 0, -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _eager_and_compiled(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """`(module, forward)` for `model` as it is and for a deep copy under `torch.compile(fullgraph=True)`."""
    twin = copy.deepcopy(model)
    return [(model, model), (twin, torch.compile(twin, fullgraph=True))]


def _train(model, forward, steps: int = 2) -> list[dict]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    for step in range(steps):
        out = forward(**_batch(padded=step == 0), output_router_logits=True)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        biases = [block.e_score_correction_bias.clone() for block in model.model.moe_blocks]
        records.append({"loss": out.loss.detach(), "aux": out.aux_loss.detach(), "z": out.z_loss.detach(),
                        "load": out.expert_load, "grads": grads, "biases": biases})  # fmt: skip
    return records


@needs_compilable_fallback
@pytest.mark.parametrize("top_k, aux_type", [(1, "global"), (2, "sequence")])
def test_compiled_training_matches_eager_losses_gradients_loads_and_balancing_bias(top_k, aux_type):
    config = {"num_experts_per_tok": top_k, "router_aux_loss_type": aux_type, "num_hidden_layers": 2, **BALANCING}
    eager, compiled = (_train(*pair) for pair in _eager_and_compiled(tiny_model(seed=3, **config).train()))
    for step, (e, c) in enumerate(zip(eager, compiled)):
        assert torch.equal(c["load"], e["load"]), f"step {step}: expert loads"
        for key in ("loss", "aux", "z"):
            torch.testing.assert_close(c[key], e[key], rtol=1e-5, atol=1e-6, msg=f"step {step}: {key}")
        assert c["grads"].keys() == e["grads"].keys()
        for name, grad in e["grads"].items():
            torch.testing.assert_close(c["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        for layer, (cb, eb) in enumerate(zip(c["biases"], e["biases"])):
            assert torch.equal(cb, eb), f"step {step}, layer {layer}: balancing bias"
    assert any(b.abs().sum() > 0 for b in eager[-1]["biases"]), "the bias never moved: the test checks nothing"


@needs_compilable_fallback
def test_compiled_lora_training_matches_eager_on_the_routed_expert_adapters():
    """PEFT LoRA on attention and the routed experts (llama4x's activation path) compiles without a graph break."""
    from peft import get_peft_model

    from llama4x import lora_config

    base = tiny_model(seed=5, num_hidden_layers=2).train()  # a chunked RoPE layer and a global NoPE layer
    eager_model = get_peft_model(base, lora_config(base, r=2))
    for name, param in eager_model.named_parameters():  # PEFT starts B at zero: give every factor a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    grads = []
    for model, forward in _eager_and_compiled(eager_model):
        out = forward(**_batch(padded=True))
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        grads[-1]["loss"] = out.loss.detach()
    assert any("experts" in name for name in grads[0]), "no routed-expert adapter was trained"
    assert grads[1].keys() == grads[0].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_bfloat16_training_matches_eager():
    """bfloat16 takes torch's grouped GEMM under compile (every supported transformers): loss and expert gradients
    within bfloat16 precision of the eager model's."""
    eager_model = tiny_model(seed=6, dtype=torch.bfloat16, num_hidden_layers=2, **BALANCING).train()
    results = []
    for model, forward in _eager_and_compiled(eager_model):
        out = forward(**_batch(padded=False))
        out.loss.backward()
        results.append((out.loss.float(), model.model.layers[0].feed_forward.experts.gate_up_proj.grad.float()))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-2, atol=0)
    assert eager_grad.abs().sum() > 0
    relative = (compiled_grad - eager_grad).norm() / eager_grad.norm()
    assert relative < 0.05, f"expert gradients differ by {relative:.3f} (relative norm)"
