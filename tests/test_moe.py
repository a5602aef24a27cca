"""The MoE block (router, routed experts, shared expert) against a float64 per-token loop written here.

Every experts implementation (`eager`, `grouped_mm`, `batched_mm`) is selected through
`config._experts_implementation`, which transformers' `use_experts_implementation` dispatches on; the block, its
experts and the test share one config object, so switching it switches the implementation in place. At these token
counts and without autograd, `grouped_mm` runs `experts_cpu.cpu_expert_loop` on CPU; `grouped_mm:torch` lowers the
loop's limit to 0 so that torch's grouped GEMM runs.
"""

import itertools

import pytest
import torch

from llama4x import experts_cpu
from llama4x.moe import Llama4XMoE, route
from tiny import tiny_model, tiny_text_config

IMPLEMENTATIONS = ["eager", "grouped_mm", "grouped_mm:torch", "batched_mm"]
HIDDEN, EXPERTS, INTERMEDIATE = 32, 8, 16  # tiny_text_config's hidden_size, num_local_experts, moe_intermediate_size


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP wake-up stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def select_implementation(block: Llama4XMoE, implementation: str, monkeypatch) -> None:
    name, _, kernel = implementation.partition(":")
    if kernel == "torch":
        monkeypatch.setattr(experts_cpu, "MAX_PAIRS", 0)
    block.config._experts_implementation = name
    assert block.experts.config._experts_implementation == name


def make_block(seed: int = 0, **overrides) -> Llama4XMoE:
    """A `Llama4XMoE` on a tiny config with O(1)-output random weights drawn from a fixed seed."""
    config = tiny_text_config(**overrides)
    torch.manual_seed(seed)
    block = Llama4XMoE(config).eval()
    with torch.no_grad():
        block.router.weight.normal_(0.0, 0.5)
        block.experts.gate_up_proj.normal_(0.0, 0.3)
        block.experts.down_proj.normal_(0.0, 0.3)
        for linear in (block.shared_experts.gate_proj, block.shared_experts.up_proj, block.shared_experts.down_proj):
            linear.weight.normal_(0.0, 0.3)
    return block


def silu64(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def float64_params(block: Llama4XMoE) -> dict[str, torch.Tensor]:
    """Detached float64 copies (leaves that require grad) of every weight of the block."""
    shared = block.shared_experts
    weights = {
        "router": block.router.weight,
        "gate_up": block.experts.gate_up_proj,  # (E, 2I, H): [gate; up]
        "down": block.experts.down_proj,  # (E, H, I)
        "shared_gate": shared.gate_proj.weight,
        "shared_up": shared.up_proj.weight,
        "shared_down": shared.down_proj.weight,
    }
    return {name: w.detach().double().requires_grad_() for name, w in weights.items()}


def reference_routing(x_TH: torch.Tensor, router: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 routing: top-k on the logits, weights = gathered scores, optional renormalisation, scaling."""
    logits = x_TH @ router.T
    if config.router_score_func == "sigmoid":
        scores = 1.0 / (1.0 + torch.exp(-logits))
    else:
        scores = torch.exp(logits - logits.max(-1, keepdim=True).values)
        scores = scores / scores.sum(-1, keepdim=True)
    index = torch.topk(logits, config.num_experts_per_tok, dim=-1).indices
    weight = scores.gather(-1, index)
    if config.norm_topk_prob:
        weight = weight / weight.sum(-1, keepdim=True)
    return index, weight * config.routed_scaling_factor


def reference_moe(x: torch.Tensor, params: dict[str, torch.Tensor], config) -> torch.Tensor:
    """float64 loop over tokens and their top-k experts, plus the shared SwiGLU expert (differentiable)."""
    x_TH = x.reshape(-1, x.shape[-1])
    index, weight = reference_routing(x_TH, params["router"], config)
    gate_up, down = params["gate_up"], params["down"]
    intermediate = down.shape[-1]
    rows = []
    for t in range(x_TH.shape[0]):
        row = torch.zeros_like(x_TH[t])
        for k in range(index.shape[1]):
            e, w = int(index[t, k]), weight[t, k]
            expert_in = w * x_TH[t] if config.router_weight_on_input else x_TH[t]
            h = gate_up[e] @ expert_in
            expert_out = down[e] @ (silu64(h[:intermediate]) * h[intermediate:])
            row = row + (expert_out if config.router_weight_on_input else w * expert_out)
        rows.append(row)
    shared = (silu64(x_TH @ params["shared_gate"].T) * (x_TH @ params["shared_up"].T)) @ params["shared_down"].T
    return (torch.stack(rows) + shared).view(x.shape)


# routed_scaling_factor is 2.5 throughout (!= 1, so a missing or doubled scaling shows)
ROUTING_CASES = list(itertools.product([True, False], ["sigmoid", "softmax"], [False, True], [2.5], [1, 2]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("weight_on_input", "score_func", "norm_topk", "scaling", "top_k"),
    ROUTING_CASES,
    ids=[f"on_input={a}-{b}-norm={c}-scale={d}-k{e}" for a, b, c, d, e in ROUTING_CASES],
)
def test_moe_block_output_matches_float64_per_token_expert_loop(
    implementation, weight_on_input, score_func, norm_topk, scaling, top_k, monkeypatch
):
    block = make_block(
        router_weight_on_input=weight_on_input,
        router_score_func=score_func,
        norm_topk_prob=norm_topk,
        routed_scaling_factor=scaling,
        num_experts_per_tok=top_k,
    )
    select_implementation(block, implementation, monkeypatch)
    x = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, logits = block(x)[:2]  # (out, router_logits, ...)
    expected = reference_moe(x.double(), float64_params(block), block.config).detach()
    diff = (out.double() - expected).abs().max().item()
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5), f"max abs diff {diff:.3e}"
    expected_logits = x.reshape(-1, HIDDEN).double() @ block.router.weight.double().T
    logit_diff = (logits.double() - expected_logits).abs().max().item()
    assert logits.shape == (14, EXPERTS) and logit_diff < 1e-5, f"router logits max abs diff {logit_diff:.3e}"


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_experts_implementations_switch_through_model_set_experts_implementation(implementation):
    model = tiny_model(seed=3)
    model.set_experts_implementation(implementation)
    block = model.model.layers[0].feed_forward
    assert block.experts.config._experts_implementation == implementation
    x = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = block(x)[0]
    expected = reference_moe(x.double(), float64_params(block), block.config).detach()
    diff = (out.double() - expected).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff:.3e}"


USED_EXPERTS = (0, 3)


def make_two_expert_batch(block: Llama4XMoE, tokens: int = 24) -> torch.Tensor:
    """Inputs and router weights such that only experts 0 and 3 can win the top-k.

    Coordinate 0 of every token is 1 and the router's column 0 is +3 for experts {0, 3} and -3 for the rest; the
    remaining coordinates add noise (|noise| << 6) that decides between experts 0 and 3 for top-1. Logits stay
    moderate so sigmoid does not saturate and the router receives a gradient.
    """
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        block.router.weight.normal_(0.0, 0.05, generator=generator)
        block.router.weight[:, 0] = -3.0
        block.router.weight[list(USED_EXPERTS), 0] = 3.0
    x = torch.randn(tokens, HIDDEN, generator=generator)
    x[:, 0] = 1.0
    return x.view(2, tokens // 2, HIDDEN)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("weight_on_input", [True, False], ids=["weight_on_input", "weight_on_output"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_gradients_reach_router_and_used_experts_only(implementation, weight_on_input, top_k, monkeypatch):
    block = make_block(router_weight_on_input=weight_on_input, num_experts_per_tok=top_k)
    select_implementation(block, implementation, monkeypatch)
    x = make_two_expert_batch(block)
    index, _ = reference_routing(x.reshape(-1, HIDDEN).double(), block.router.weight.detach().double(), block.config)
    counts = torch.bincount(index.flatten(), minlength=EXPERTS)
    used = {e for e in range(EXPERTS) if counts[e] > 0}
    assert used == set(USED_EXPERTS), f"test precondition: routed experts {counts.tolist()}"

    out = block(x)[0]
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    (out * probe).sum().backward()

    router_grad = block.router.weight.grad
    assert router_grad is not None and router_grad.abs().max() > 0, "router weight got no gradient"
    assert torch.isfinite(router_grad).all()
    gate_up_grad, down_grad = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    for e in range(EXPERTS):
        gu_max, d_max = gate_up_grad[e].abs().max().item(), down_grad[e].abs().max().item()
        if e in used:
            assert gu_max > 0 and d_max > 0, f"expert {e} received tokens but got grads {gu_max}, {d_max}"
        else:
            assert gu_max == 0 and d_max == 0, f"expert {e} received no tokens but got grads {gu_max}, {d_max}"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("weight_on_input", [True, False], ids=["weight_on_input", "weight_on_output"])
def test_moe_input_and_weight_gradients_match_float64_autograd_of_reference_loop(
    implementation, weight_on_input, monkeypatch
):
    block = make_block(seed=5, num_experts_per_tok=2, router_weight_on_input=weight_on_input, norm_topk_prob=True)
    select_implementation(block, implementation, monkeypatch)
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(4))
    probe = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(6))

    x32 = x.clone().requires_grad_()
    out = block(x32)[0]
    (out * probe).sum().backward()
    got = {
        "input": x32.grad,
        "router": block.router.weight.grad,
        "gate_up": block.experts.gate_up_proj.grad,
        "down": block.experts.down_proj.grad,
    }

    params = float64_params(block)
    x64 = x.double().requires_grad_()
    (reference_moe(x64, params, block.config) * probe.double()).sum().backward()
    expected = {"input": x64.grad, **{name: params[name].grad for name in ("router", "gate_up", "down")}}
    for name, grad in got.items():
        diff = (grad.double() - expected[name]).abs().max().item()
        assert torch.allclose(grad.double(), expected[name], rtol=1e-5, atol=1e-5), (
            f"{name} grad max abs diff {diff:.3e}"
        )


ROUTE_CASES = list(itertools.product(["sigmoid", "softmax"], [False, True], [1.0, 2.5], [1, 3]))


@pytest.mark.parametrize(("score_func", "norm_topk", "scaling", "top_k"), ROUTE_CASES)
def test_route_indices_in_range_weights_finite_and_normalised_sum(score_func, norm_topk, scaling, top_k):
    config = tiny_text_config(
        router_score_func=score_func,
        norm_topk_prob=norm_topk,
        routed_scaling_factor=scaling,
        num_experts_per_tok=top_k,
    )
    logits = torch.randn(50, EXPERTS, generator=torch.Generator().manual_seed(0)) * 6.0
    routing = route(logits, config)
    assert routing.topk_index.shape == (50, top_k) and routing.topk_weight.shape == (50, top_k)
    assert routing.topk_index.min() >= 0 and routing.topk_index.max() < EXPERTS
    assert all(len(set(row)) == top_k for row in routing.topk_index.tolist()), "an expert chosen twice for a token"
    assert torch.isfinite(routing.topk_weight).all()
    assert (routing.topk_weight > 0).all()
    # the chosen experts are the top-k by score (hand check against a sort of the logits)
    expected_sets = [set(row) for row in logits.argsort(dim=-1, descending=True)[:, :top_k].tolist()]
    assert [set(row) for row in routing.topk_index.tolist()] == expected_sets
    if norm_topk:
        sums = routing.topk_weight.double().sum(-1)
        diff = (sums - scaling).abs().max().item()
        assert diff < 1e-6, f"normalised top-k weights sum to {scaling} up to max abs diff {diff:.3e}"
