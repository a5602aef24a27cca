"""PEFT LoRA on the routed experts, applied to activations.

`llama4x.lora_config` adapts the stacked expert weights through PEFT's `target_parameters`: PEFT wraps
`Llama4XExperts` in one `ParamWrapper` per weight, and each call re-parametrises the weight as `W + s * B_e A_e` for
every expert: it rebuilds an `(E, out, in)` tensor per projection per forward, and autograd computes the full
`(E, out, in)` weight gradient only to reduce it to the factors' gradients.

`Llama4XMoE` runs a PEFT-wrapped experts module through `lora_experts_forward` instead: tokens sorted by expert, one
grouped GEMM per projection for the frozen weight plus two thin grouped GEMMs for the adapter,
`x W_e^T + s (x A_e^T) B_e^T`, so the base weights get no gradient and nothing of size `(E, out, in)` is built. The
adapter is still PEFT's own: the same parameters, saved, loaded and merged by PEFT. Anything this path does not cover
(several active adapters, a merged or disabled adapter, a LoRA bias, an unexpected factor layout) goes through
PEFT's wrapper unchanged.

Shapes: S (token, expert) pairs sorted by expert, E experts, r the rank, `in`/`out` a projection's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.moe import _grouped_mm as transformers_grouped_mm

from .experts_cpu import GROUPED_GEMM_DTYPES
from .moe import Llama4XExperts


@dataclass
class ExpertLowRank:
    """One projection's adapter: `delta_e = scaling * (down_e @ up_e)^T`, i.e. `x delta_e^T = scaling (x down_e) up_e`."""

    down_EIR: torch.Tensor  # (E, in, r): A_e^T
    up_ERO: torch.Tensor  # (E, r, out): B_e^T
    scaling: float


def peft_expert_adapters(module: nn.Module) -> tuple[Llama4XExperts, dict[str, ExpertLowRank]] | None:
    """The `Llama4XExperts` inside PEFT's `ParamWrapper`s and each wrapped weight's adapter; None when any wrapper is
    in a state this path does not cover (then calling `module` runs PEFT's own forward)."""
    wrappers = []
    while not isinstance(module, Llama4XExperts):
        if not hasattr(module, "parameter_name") or not hasattr(module, "base_layer"):
            return None
        wrappers.append(module)
        module = module.base_layer
    adapters = {}
    for wrapper in wrappers:
        low_rank = _low_rank(wrapper, getattr(module, wrapper.parameter_name))
        if low_rank is None or wrapper.parameter_name in adapters:
            return None
        adapters[wrapper.parameter_name] = low_rank
    return module, adapters


def _low_rank(wrapper: nn.Module, weight_EOI: torch.Tensor) -> ExpertLowRank | None:
    """PEFT's factors for a stacked `(E, out, in)` weight: `lora_A (r*E, in)` and `lora_B (out, r*E)`, with
    `delta_e = B[:, :, e] @ A[e]` after `A -> (E, r, in)`, `B -> (out, r, E)` (PEFT's `get_delta_weight`)."""
    active = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
    if wrapper.disable_adapters or wrapper.merged or len(active) != 1:
        return None
    (name,) = active
    lora_A, lora_B = wrapper.lora_A[name], wrapper.lora_B[name]
    if lora_B.bias is not None or wrapper.use_dora.get(name, False):
        return None
    E, out_features, in_features = weight_EOI.shape
    rank = wrapper.r[name]
    if lora_A.weight.shape != (rank * E, in_features) or lora_B.weight.shape != (out_features, rank * E):
        return None
    down_EIR = lora_A.weight.reshape(E, rank, in_features).transpose(1, 2).contiguous()
    up_ERO = lora_B.weight.reshape(out_features, rank, E).permute(2, 1, 0).contiguous()
    return ExpertLowRank(down_EIR, up_ERO, wrapper.scaling[name])


def lora_experts_forward(
    experts: Llama4XExperts,
    adapters: dict[str, ExpertLowRank],
    hidden_TH: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    top_k_weights_TK: torch.Tensor,
) -> torch.Tensor:
    """`Llama4XExperts.forward` with the adapters applied to activations: weighted expert sum `(T, H)`."""
    T, K = top_k_index_TK.shape
    expert_S, order_S = torch.sort(top_k_index_TK.reshape(-1), stable=True)
    token_S = order_S // K
    experts_E = torch.arange(experts.num_experts, device=expert_S.device)
    offsets_E = torch.searchsorted(expert_S, experts_E, right=True).to(torch.int32)  # pairs up to expert e
    x_SH = hidden_TH[token_S]
    gate_SI, up_SI = _project(x_SH, experts.gate_up_proj, offsets_E, adapters.get("gate_up_proj")).chunk(2, dim=-1)
    y_SH = _project(experts.act_fn(gate_SI) * up_SI, experts.down_proj, offsets_E, adapters.get("down_proj"))
    y_SH = y_SH * top_k_weights_TK.reshape(-1)[order_S, None].to(y_SH.dtype)
    return torch.zeros_like(hidden_TH).index_add_(0, token_S, y_SH.to(hidden_TH.dtype))


def _project(
    x_SI: torch.Tensor, weight_EOI: torch.Tensor, offsets_E: torch.Tensor, low_rank: ExpertLowRank | None
) -> torch.Tensor:
    """Each pair's row times its expert's `weight^T`, plus the adapter's low-rank term."""
    out_SO = grouped_mm(x_SI, weight_EOI.transpose(-2, -1), offsets_E)
    if low_rank is not None:
        inner_SR = grouped_mm(x_SI, low_rank.down_EIR.to(x_SI.dtype), offsets_E)
        out_SO = out_SO + low_rank.scaling * grouped_mm(inner_SR, low_rank.up_ERO.to(x_SI.dtype), offsets_E)
    return out_SO


def grouped_mm(x_SI: torch.Tensor, weight_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows `offsets[e-1]:offsets[e]` of `x` times `weight[e]`, through transformers' grouped GEMM dispatcher (torch's
    kernel where it applies, a compile-safe per-expert loop otherwise), straight to that loop where torch's kernel
    rejects the operands: a row length that is not a multiple of 16 bytes (low ranks in float32), or float64."""
    x_SI = x_SI.to(weight_EIO.dtype)
    aligned = all(size * x_SI.element_size() % 16 == 0 for size in weight_EIO.shape[1:])
    if aligned and x_SI.dtype in GROUPED_GEMM_DTYPES:
        return transformers_grouped_mm(x_SI, weight_EIO, offs=offsets_E)
    return torch.ops.transformers.grouped_mm_fallback(x_SI, weight_EIO, offs=offsets_E)
