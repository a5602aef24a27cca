"""The decode-sized CPU kernel for routed experts (`llama4x.experts_cpu`) against a float64 loop over the experts,
and the rule that picks it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama4x import experts_cpu
from llama4x.experts_cpu import MAX_PAIRS, cpu_expert_loop, use_cpu_expert_loop
from llama4x.moe import Llama4XExperts
from tiny import random_ids, tiny_model, tiny_text_config


def make_experts(num_experts: int, seed: int = 0) -> Llama4XExperts:
    torch.manual_seed(seed)
    config = tiny_text_config(num_local_experts=num_experts, num_experts_per_tok=1)
    experts = Llama4XExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 0.3)
        experts.down_proj.normal_(0.0, 0.3)
    return experts


def float64_expert_sum(experts, x_TH, index_TK, weight_TK):
    """Token by token, pair by pair: `sum_k w_tk * down_e (silu(gate_e x) * up_e x)` in float64."""
    gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()
    out = torch.zeros(x_TH.shape, dtype=torch.float64)
    for t in range(x_TH.shape[0]):
        for k in range(index_TK.shape[1]):
            e = int(index_TK[t, k])
            gate, up = (gate_up[e] @ x_TH[t].double()).chunk(2)
            out[t] += weight_TK[t, k].double() * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@settings(max_examples=60, deadline=None)
@given(
    num_experts=st.integers(1, 8),
    tokens=st.integers(1, 24),
    top_k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_loop_for_any_routing(num_experts, tokens, top_k, seed):
    top_k = min(top_k, num_experts)
    experts = make_experts(num_experts, seed)
    generator = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(tokens, experts.hidden_dim, generator=generator)
    index_TK = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    weight_TK = torch.rand(tokens, top_k, generator=generator)
    with torch.no_grad():
        out = cpu_expert_loop(experts, x_TH, index_TK, weight_TK)
    expected = float64_expert_sum(experts, x_TH, index_TK, weight_TK)
    assert out.shape == x_TH.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "index",
    [[[3]], [[0], [0], [0], [0]], [[0], [1], [2], [3]], [[2], [5], [5], [7]], [[7], [1], [1], [0]]],
    ids=["one-pair", "one-expert", "all-lone", "lone-first", "lone-last"],
)
def test_lone_rows_anywhere_in_the_sorted_pairs(index):
    """A lone row is multiplied with a neighbour's row, whichever side it has one on; that row's result is dropped."""
    experts = make_experts(8)
    index_TK = torch.tensor(index)
    x_TH = torch.randn(len(index), experts.hidden_dim, generator=torch.Generator().manual_seed(1))
    weight_TK = torch.rand(len(index), 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = cpu_expert_loop(experts, x_TH, index_TK, weight_TK)
    assert (out.double() - float64_expert_sum(experts, x_TH, index_TK, weight_TK)).abs().max() < 1e-5


def test_no_tokens_give_an_empty_output():
    experts = make_experts(4)
    out = cpu_expert_loop(
        experts, torch.randn(0, experts.hidden_dim), torch.zeros(0, 2, dtype=torch.long), torch.ones(0, 2)
    )
    assert out.shape == (0, experts.hidden_dim)


def test_gradients_match_float64_autograd():
    experts = make_experts(8, seed=3)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, experts.hidden_dim, generator=generator)
    index_TK = torch.tensor([[0, 1], [1, 2], [0, 4], [5, 1], [4, 0], [7, 6]])
    weight_TK = torch.rand(6, 2, generator=generator)
    probe = torch.randn(6, experts.hidden_dim, generator=generator)

    x32 = x.clone().requires_grad_()
    (cpu_expert_loop(experts, x32, index_TK, weight_TK) * probe).sum().backward()
    reference = make_experts(8, seed=3).double()
    x64 = x.double().requires_grad_()
    reference.config._experts_implementation = "eager"
    (reference(x64, index_TK, weight_TK.double()) * probe.double()).sum().backward()
    for got, expected in [
        (x32.grad, x64.grad),
        (experts.gate_up_proj.grad, reference.gate_up_proj.grad),
        (experts.down_proj.grad, reference.down_proj.grad),
    ]:
        assert (got.double() - expected).abs().max() < 1e-5
    assert experts.gate_up_proj.grad[3].abs().max() == 0, "expert 3 got no token but a gradient"


def test_rule_picks_the_loop_for_decode_sized_float32_cpu_batches_without_autograd_only():
    experts = make_experts(8)
    hidden = torch.randn(MAX_PAIRS, experts.hidden_dim)
    index = torch.zeros(MAX_PAIRS, 1, dtype=torch.long)
    with torch.no_grad():
        assert use_cpu_expert_loop(experts, hidden, index)
        assert use_cpu_expert_loop(experts, hidden[:1], index[:1])
        assert not use_cpu_expert_loop(experts, torch.cat([hidden, hidden[:1]]), torch.cat([index, index[:1]]))
        assert not use_cpu_expert_loop(experts, hidden.bfloat16(), index)
    assert not use_cpu_expert_loop(experts, hidden, index), "trainable experts: the grouped GEMM's backward"
    experts.requires_grad_(False)
    assert use_cpu_expert_loop(experts, hidden, index), "frozen experts, input without grad: no graph"
    assert not use_cpu_expert_loop(experts, hidden.requires_grad_(), index), "gradient to the input"


def test_model_logits_equal_with_the_loop_and_with_torchs_grouped_gemm(monkeypatch):
    """Decode-sized forward of a whole model: the loop (default) and torch's grouped GEMM (limit 0) agree."""
    model = tiny_model(seed=5)
    model.set_experts_implementation("grouped_mm")
    ids = random_ids(3, 4, seed=6)  # 12 tokens top-2: 24 pairs per MoE layer
    with torch.no_grad():
        with_loop = model(ids).logits
        monkeypatch.setattr(experts_cpu, "MAX_PAIRS", 0)
        with_grouped_gemm = model(ids).logits
    assert (with_loop - with_grouped_gemm).abs().max() < 1e-5


def test_float64_model_with_the_default_experts_matches_the_eager_loop():
    """torch's grouped GEMM takes no float64: the default `grouped_mm` runs the per-expert loop there instead of
    failing, in inference and in training (gradients)."""
    ids = random_ids(2, 9)
    models = {impl: tiny_model(seed=3, dtype=torch.float64) for impl in ("grouped_mm", "eager")}
    models["eager"].set_experts_implementation("eager")
    losses = {impl: model(ids, labels=ids).loss for impl, model in models.items()}
    for loss in losses.values():
        loss.backward()
    assert torch.allclose(losses["grouped_mm"], losses["eager"], rtol=1e-12, atol=0)
    grads = {impl: model.model.layers[0].feed_forward.experts.gate_up_proj.grad for impl, model in models.items()}
    assert torch.allclose(grads["grouped_mm"], grads["eager"], rtol=1e-10, atol=1e-14)
