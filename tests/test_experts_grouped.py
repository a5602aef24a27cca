"""llama4x's grouped experts (`llama4x.experts_grouped`) against transformers' own `grouped_mm` experts function
(the same products, another implementation), a loop over experts, and the operator count it exists to cut."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from llama4x import experts_grouped
from llama4x.benchmarks.overhead import OperatorCounter
from llama4x.experts_cpu import cpu_expert_loop
from llama4x.experts_grouped import grouped_experts_forward, grouped_mm
from test_experts_cpu import float64_expert_sum, make_experts
from tiny import random_ids, tiny_model

transformers_grouped_mm_experts = ALL_EXPERTS_FUNCTIONS["grouped_mm"]


def random_routing(tokens: int, num_experts: int, top_k: int, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 32, generator=generator).to(dtype)
    index = torch.rand(tokens, num_experts, generator=generator).argsort(dim=-1)[:, :top_k]  # distinct per token
    weights = torch.rand(tokens, top_k, generator=generator).to(dtype)
    return hidden, index, weights


@settings(max_examples=40, deadline=None)
@given(
    num_experts=st.integers(1, 8),
    tokens=st.integers(1, 40),
    top_k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_equals_transformers_grouped_mm_experts_bitwise(num_experts, tokens, top_k, seed, dtype):
    """Same kernels, same order of operations per output: identical outputs, any routing, empty experts included."""
    top_k = min(top_k, num_experts)
    experts = make_experts(num_experts, seed=seed).to(dtype)
    hidden, index, weights = random_routing(tokens, num_experts, top_k, seed, dtype)
    with torch.no_grad():
        ours = grouped_experts_forward(experts, hidden, index, weights)
        theirs = transformers_grouped_mm_experts(experts, hidden, index, weights)
    assert ours.dtype == dtype and ours.shape == hidden.shape
    if top_k == 1:
        assert torch.equal(ours, theirs)
    else:  # both sum the K rows with `sum`; allow for its reduction order
        torch.testing.assert_close(ours, theirs, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_equal_float64_autograd_of_a_loop_over_pairs(top_k):
    """Input, combine-weight and expert-weight gradients against autograd through `float64_expert_sum`."""
    experts = make_experts(4, seed=3)
    hidden, index, weights = random_routing(12, 4, top_k, seed=4)
    upstream = torch.randn(12, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for forward in (grouped_experts_forward, float64_expert_sum):
        experts.zero_grad(set_to_none=True)
        x, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        (forward(experts, x, index, w).double() * upstream).sum().backward()
        grads.append([t.grad.double() for t in (x, w, experts.gate_up_proj, experts.down_proj)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_tokens_give_an_empty_output():
    experts = make_experts(4)
    out = grouped_experts_forward(experts, torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 32)


def test_dispatches_fewer_operators_than_transformers_grouped_mm():
    """The reason this module exists: a decode-sized bfloat16 call (the GPU path) dispatches fewer ATen operators
    (each one costs host time on a GPU) than transformers' function, for top-1 and top-2."""
    experts = make_experts(16).to(torch.bfloat16)
    for top_k in (1, 2):
        hidden, index, weights = random_routing(1, 16, top_k, seed=0, dtype=torch.bfloat16)
        counts = {}
        for name, function in (("ours", grouped_experts_forward), ("transformers", transformers_grouped_mm_experts)):
            with torch.no_grad(), OperatorCounter(experts) as counter:
                function(experts, hidden, index, weights)
            counts[name] = sum(counter.counts.values())
        assert counts["ours"] <= counts["transformers"] - 3, counts  # 5.24: 18 vs 25 (top-1), 21 vs 24 (top-2)


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
def test_only_grouped_mm_dispatches_to_the_cpu_loop(implementation, monkeypatch):
    """`grouped_mm` (the default) takes the loop at decode sizes; a model set to another implementation keeps it."""
    model = tiny_model(seed=1)
    model.set_experts_implementation(implementation)
    calls = []
    monkeypatch.setattr(experts_grouped, "cpu_expert_loop", lambda *args: calls.append(1) or cpu_expert_loop(*args))
    with torch.no_grad():
        model(random_ids(1, 3))
    assert len(calls) == (4 if implementation == "grouped_mm" else 0)  # one per MoE layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [(6, 3), (16, 8)], ids=["loop", "grouped"])  # rows of 16 bytes or not
def test_grouped_mm_equals_a_loop_over_experts_including_empty_groups(dtype, sizes):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, sizes[0], generator=generator).to(dtype).requires_grad_(True)
    w = torch.randn(4, *sizes, generator=generator).to(dtype).requires_grad_(True)
    offsets = torch.tensor([3, 3, 9, 10], dtype=torch.int32)  # expert 1 gets no rows
    expected = torch.cat([x[0:3] @ w[0], x[3:9] @ w[2], x[9:10] @ w[3]])
    (grouped_mm(x, w, offsets) * torch.randn(10, sizes[1]).to(dtype)).sum().backward()  # backward: same operands
    assert x.grad is not None and w.grad[1].abs().sum() == 0
    torch.testing.assert_close(
        grouped_mm(x, w, offsets),
        expected,
        rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
        atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
    )
