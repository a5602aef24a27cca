"""Routed experts for decode-sized batches on CPU.

At decode, each used expert gets one or two tokens. torch's CPU grouped GEMM loops over the experts calling
`x_e @ W_e^T`, which MKL runs as a single-threaded product at about a third of the memory bandwidth here (2-core
AMD EPYC, fp32). The same product written `W_e @ x_e^T` on at least two rows runs as a threaded GEMM at 2-3x the
bandwidth, so this path:
    - sorts the (token, expert) pairs by expert, as `grouped_mm` does;
    - per used expert computes `(W_e @ x_e^T)^T`, on a lone row together with its neighbour so the product has two;
    - scales by the combine weights and sums the pairs back per token.
Measured on the benchmark's 8 MoE layers (hidden 512, 16 experts of 1024): 1.4x faster than `grouped_mm` at 1
pair, 2.4x at 8, 2.2x at 64, 1.1x at 128, 0.85x at 256; slower in bfloat16 at every size, and 4-8x slower with a
backward pass (forward+backward at 8 and 32 pairs). Hence the rule in
`use_cpu_expert_loop`, which llama4x's `grouped_mm` (`experts_grouped.py`) applies. Inside the experts module's
forward, so hooks on it (accelerate's offloading) run first.

Shapes: T tokens, K experts per token, S = T * K pairs, H hidden, I expert intermediate size, n rows of one expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .expert_pairs import sort_pairs

if TYPE_CHECKING:
    from .moe import Llama4XExperts

MAX_PAIRS = 128  # above this torch's grouped GEMM is as fast or faster (measured, see above)


def use_cpu_expert_loop(experts: Llama4XExperts, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor) -> bool:
    """Whether `cpu_expert_loop` is the faster kernel: float32 on CPU, at most `MAX_PAIRS` pairs, no autograd graph
    (backward through `weight[expert]` builds a full-size gradient per used expert: 4-8x slower than the grouped
    GEMM's backward, measured), outside `torch.compile` (the loop's sizes are data-dependent)."""
    if hidden_TH.device.type != "cpu":  # first: the whole cost of this rule on accelerators
        return False
    records_graph = torch.is_grad_enabled() and (
        hidden_TH.requires_grad or experts.gate_up_proj.requires_grad or experts.down_proj.requires_grad
    )
    return (
        not records_graph
        and hidden_TH.dtype == experts.gate_up_proj.dtype == torch.float32
        and top_k_index_TK.numel() <= MAX_PAIRS
        and not torch.compiler.is_compiling()
    )


def cpu_expert_loop(
    experts: Llama4XExperts, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor
) -> torch.Tensor:
    """`Llama4XExperts.forward` as one threaded GEMM per used expert and projection: weighted expert sum `(T, H)`."""
    if top_k_index_TK.numel() == 0:
        return torch.zeros_like(hidden_TH)
    pairs = sort_pairs(top_k_index_TK, experts.num_experts)
    x_SH = pairs.gather_rows(hidden_TH)
    ends = pairs.offsets_E.tolist()  # the loop's sizes: one read-back
    rows_per_expert = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    if x_SH.shape[0] == 1:
        x_SH = x_SH.repeat(2, 1)  # one pair in all: a second row for the two-row window below
    outputs, start = [], 0
    for expert, rows in enumerate(rows_per_expert):
        if rows == 0:
            continue
        # A one-row product runs single-threaded (GEMV); two rows take the threaded GEMM. So a lone row is
        # multiplied together with its neighbour (a view, no copy), whose result is dropped.
        first = min(start, x_SH.shape[0] - 2) if rows == 1 else start
        x_nH = x_SH[first : first + max(rows, 2)]
        gate_In, up_In = (experts.gate_up_proj[expert] @ x_nH.T).chunk(2, dim=0)  # (2I, n) -> 2 x (I, n)
        act_nI = (experts.act_fn(gate_In) * up_In).T.contiguous()
        y_Hn = experts.down_proj[expert] @ act_nI.T
        outputs.append(y_Hn.T[start - first : start - first + rows])  # (rows, H)
        start += rows
    y_SH = torch.cat(outputs) * pairs.gather_weights(top_k_weights_TK).to(hidden_TH.dtype)
    return pairs.sum_per_token(y_SH)
