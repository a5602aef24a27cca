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
`use_cpu_expert_loop`, applied to the default `grouped_mm` through transformers' experts interface (a local
mapping, so other models keep transformers' `grouped_mm`). Inside the experts module's forward, so hooks on it
(accelerate's offloading) run first.

Shapes: T tokens, K experts per token, S = T * K pairs, H hidden, I expert intermediate size, n rows of one expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

if TYPE_CHECKING:
    from .moe import Llama4XExperts

MAX_PAIRS = 128  # above this torch's grouped GEMM is as fast or faster (measured, see above)
GROUPED_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch's grouped GEMM kernel takes


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
    K = top_k_index_TK.shape[1]
    expert_S, order_S = torch.sort(top_k_index_TK.reshape(-1), stable=True)
    token_S = order_S // K
    x_SH = hidden_TH[token_S]
    rows_per_expert = torch.bincount(expert_S, minlength=experts.num_experts).tolist()
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
    y_SH = torch.cat(outputs) * top_k_weights_TK.reshape(-1)[order_S, None].to(hidden_TH.dtype)
    return torch.zeros_like(hidden_TH).index_add_(0, token_S, y_SH)


def grouped_mm_or_cpu_expert_loop(
    experts: Llama4XExperts, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor
) -> torch.Tensor:
    """llama4x's `grouped_mm`: `cpu_expert_loop` where `use_cpu_expert_loop` says so or where torch's grouped GEMM
    takes no such dtype (float64, on any device: the loop is exact there too), else transformers' own."""
    if hidden_TH.dtype not in GROUPED_GEMM_DTYPES or use_cpu_expert_loop(experts, hidden_TH, top_k_index_TK):
        return cpu_expert_loop(experts, hidden_TH, top_k_index_TK, top_k_weights_TK)
    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, hidden_TH, top_k_index_TK, top_k_weights_TK)


LLAMA4X_EXPERTS_FUNCTIONS = ExpertsInterface()
LLAMA4X_EXPERTS_FUNCTIONS["grouped_mm"] = grouped_mm_or_cpu_expert_loop
