"""Routed-expert LoRA on activations (`llama4x.lora_experts`) computes what PEFT's own parameter LoRA computes:
outputs and gradients against PEFT's `ParamWrapper` forward (W + delta rebuilt each call) and against a float64
recomputation from PEFT's `get_delta_weight`; PEFT's path is kept where ours does not apply."""

import torch

from llama4x.lora_experts import lora_experts_forward, peft_expert_adapters
from llama4x.moe import Llama4XExperts
from test_lora import lora_model
from tiny import random_ids


def first_moe(peft_model):
    return peft_model.base_model.model.model.layers[1].feed_forward


def routed_inputs(moe, tokens=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(tokens, moe.config.hidden_size, generator=generator, requires_grad=True)
    index_TK = torch.stack(
        [torch.randperm(moe.config.num_local_experts, generator=generator)[:2] for _ in range(tokens)]
    )
    index_TK[:, 0] = index_TK[:, 0] % 5  # experts 5.. get fewer tokens, some none
    weight_TK = torch.rand(tokens, 2, generator=generator)
    return x_TH, index_TK, weight_TK


def outputs_and_grads(fn, x_TH, peft_model):
    out = fn()
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
    grads["input"] = x_TH.grad.clone()
    peft_model.zero_grad(set_to_none=True)
    x_TH.grad = None
    return out.detach(), grads


def test_activation_lora_matches_pefts_weight_lora_outputs_and_gradients():
    peft_model = lora_model(("routed_experts",))
    moe = first_moe(peft_model)
    unwrapped = peft_expert_adapters(moe.experts)
    assert unwrapped is not None and set(unwrapped[1]) == {"gate_up_proj", "down_proj"}
    x_TH, index_TK, weight_TK = routed_inputs(moe)
    ours, our_grads = outputs_and_grads(
        lambda: lora_experts_forward(*unwrapped, x_TH, index_TK, weight_TK), x_TH, peft_model
    )
    peft, peft_grads = outputs_and_grads(lambda: moe.experts(x_TH, index_TK, weight_TK), x_TH, peft_model)
    torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == peft_grads.keys() and any("lora_A" in n for n in our_grads)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_lora_matches_a_float64_recomputation_from_pefts_delta_weights():
    peft_model = lora_model(("routed_experts",), seed=3)
    moe = first_moe(peft_model)
    experts, adapters = peft_expert_adapters(moe.experts)
    x_TH, index_TK, weight_TK = routed_inputs(moe, seed=1)
    wrappers = {moe.experts.parameter_name: moe.experts, moe.experts.base_layer.parameter_name: moe.experts.base_layer}
    weights = {
        name: (getattr(experts, name) + wrapper.get_delta_weight("default")).double()
        for name, wrapper in wrappers.items()
    }
    expected = torch.zeros(x_TH.shape, dtype=torch.float64)
    x64 = x_TH.detach().double()
    for t in range(x_TH.shape[0]):
        for k in range(2):
            e = index_TK[t, k]
            gate, up = (weights["gate_up_proj"][e] @ x64[t]).chunk(2)
            expected[t] += weight_TK[t, k].double() * (weights["down_proj"][e] @ (torch.nn.functional.silu(gate) * up))
    with torch.no_grad():
        ours = lora_experts_forward(experts, adapters, x_TH, index_TK, weight_TK)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_moe_block_runs_peft_models_through_the_activation_path_and_the_model_trains():
    peft_model = lora_model(("routed_experts",), seed=5).train()
    ids = random_ids(2, 16)
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(type(module).__name__)
    )
    try:
        loss = peft_model(input_ids=ids, labels=ids).loss
    finally:
        hook.remove()
    assert "ParamWrapper" not in calls and "Llama4XExperts" not in calls, "the wrappers' own forward ran"
    loss.backward()
    adapter_grads = [p.grad for n, p in peft_model.named_parameters() if "experts" in n and "lora_" in n]
    assert adapter_grads and all(g is not None and g.abs().sum() > 0 for g in adapter_grads)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_merged_disabled_or_several_adapters_use_pefts_own_forward():
    peft_model = lora_model(("routed_experts",), seed=7)
    moe = first_moe(peft_model)
    with peft_model.disable_adapter():
        assert peft_expert_adapters(moe.experts) is None
    peft_model.merge_adapter()
    assert peft_expert_adapters(moe.experts) is None
    peft_model.unmerge_adapter()
    assert peft_expert_adapters(moe.experts) is not None
    peft_model.add_adapter("second", peft_model.peft_config["default"])
    peft_model.base_model.set_adapter(["default", "second"])
    assert peft_expert_adapters(moe.experts) is None
    peft_model.base_model.set_adapter("default")
    assert peft_expert_adapters(moe.experts) is not None
    inner = peft_expert_adapters(moe.experts)[0]
    inner._is_expert_parallel = True  # as transformers' expert-parallel plan marks split experts
    assert peft_expert_adapters(moe.experts) is None
    plain = Llama4XExperts(moe.config)
    assert peft_expert_adapters(plain) == (plain, {})


def test_float64_model_runs_the_activation_path_and_matches_pefts_merged_weights():
    peft_model = lora_model(("routed_experts",), seed=9).double()  # torch's grouped GEMM kernel rejects float64
    ids = random_ids(2, 16)
    with torch.no_grad():
        ours = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits  # eager experts on W + delta, PEFT's own merge
    diff = (ours - merged).abs().max().item()
    assert ours.dtype == torch.float64 and diff < 1e-12, f"float64 activation path vs merged weights: max diff {diff}"
