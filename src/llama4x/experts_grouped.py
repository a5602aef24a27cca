"""llama4x's `grouped_mm` experts: one grouped GEMM per projection over the pairs sorted by expert.

transformers' own `grouped_mm` experts function computes the same products. This one dispatches fewer operators
(a decode step on a GPU runs at the speed of the host, one operator at a time), and it is the same code under every
transformers version: transformers 5.17 masks expert-parallel sentinel rows in every forward and backward even
without expert parallelism (1.3 ms of the Scout-shape layer's 25.8 ms on the H200). Per call:
    sort, searchsorted (offsets), gather rows, 2 grouped GEMMs, SwiGLU, combine weights, copy back to routing order
against transformers 5.24's histc, float cast, cumsum, integer division, inverse permutation (arange, index_put)
and gather back.

Decode-sized float32 batches on CPU go to `experts_cpu`'s loop instead, and dtypes torch's grouped GEMM does not
take (float64) too; experts split over expert-parallel processes go to transformers' function, which skips the pairs
of other processes' experts: see `llama4x_grouped_mm`.

Shapes: T tokens, K experts per token, S = T * K pairs, E experts, H hidden, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
from transformers.integrations.moe import _grouped_mm as transformers_grouped_mm

from .expert_pairs import sort_pairs
from .experts_cpu import cpu_expert_loop, use_cpu_expert_loop

if TYPE_CHECKING:
    from .moe import Llama4XExperts

GROUPED_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch's grouped GEMM kernel takes


def grouped_mm(x_SI: torch.Tensor, weight_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows `offsets[e-1]:offsets[e]` of `x` times `weight[e]`, through transformers' grouped GEMM dispatcher (torch's
    kernel where it applies, a compile-safe per-expert loop otherwise), straight to that loop where torch's kernel
    rejects the operands: a row length that is not a multiple of 16 bytes (low ranks in float32), or float64."""
    x_SI = x_SI.to(weight_EIO.dtype)
    aligned = all(size * x_SI.element_size() % 16 == 0 for size in weight_EIO.shape[1:])
    if aligned and x_SI.dtype in GROUPED_GEMM_DTYPES:
        return transformers_grouped_mm(x_SI, weight_EIO, offs=offsets_E)
    return torch.ops.transformers.grouped_mm_fallback(x_SI, weight_EIO, offs=offsets_E)


# An additive term per projection: (projection name, input rows (S, in), offsets (E,)) -> (S, out) or None.
ProjectionTerm = Callable[[str, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def grouped_experts_forward(
    experts: Llama4XExperts,
    hidden_TH: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    top_k_weights_TK: torch.Tensor,
    extra_term: ProjectionTerm | None = None,
) -> torch.Tensor:
    """`Llama4XExperts.forward` as two grouped GEMMs: weighted expert sum `(T, H)`. `extra_term` adds to each
    projection's output (the LoRA adapters of `lora_experts.py`)."""
    pairs = sort_pairs(top_k_index_TK, experts.num_experts)

    def project(name: str, x_SI: torch.Tensor) -> torch.Tensor:
        out_SO = grouped_mm(x_SI, getattr(experts, name).transpose(-2, -1), pairs.offsets_E)
        term_SO = None if extra_term is None else extra_term(name, x_SI, pairs.offsets_E)
        return out_SO if term_SO is None else out_SO + term_SO

    gate_SI, up_SI = project("gate_up_proj", pairs.gather_rows(hidden_TH)).chunk(2, dim=-1)
    y_SH = project("down_proj", experts.act_fn(gate_SI) * up_SI)
    y_SH = y_SH * pairs.gather_weights(top_k_weights_TK).to(y_SH.dtype)
    return pairs.sum_per_token(y_SH).to(hidden_TH.dtype)


def llama4x_grouped_mm(
    experts: Llama4XExperts, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor
) -> torch.Tensor:
    """The default experts implementation: transformers' own `grouped_mm` when the experts are split over
    expert-parallel ranks (it skips the off-rank pairs, marked by ids `>= num_experts`); `cpu_expert_loop` where
    `use_cpu_expert_loop` says so or where torch's grouped GEMM takes no such dtype (float64, on any device: the loop
    is exact there); else the grouped GEMMs."""
    if getattr(experts, "_is_expert_parallel", False):
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, hidden_TH, top_k_index_TK, top_k_weights_TK)
    if hidden_TH.dtype not in GROUPED_GEMM_DTYPES or use_cpu_expert_loop(experts, hidden_TH, top_k_index_TK):
        return cpu_expert_loop(experts, hidden_TH, top_k_index_TK, top_k_weights_TK)
    return grouped_experts_forward(experts, hidden_TH, top_k_index_TK, top_k_weights_TK)


LLAMA4X_EXPERTS_FUNCTIONS = ExpertsInterface()  # a local mapping: other models keep transformers' functions
LLAMA4X_EXPERTS_FUNCTIONS["grouped_mm"] = llama4x_grouped_mm
