"""PEFT LoRA on the routed experts, applied to activations.

`llama4x.lora_config` adapts the stacked expert weights through PEFT's `target_parameters`: PEFT wraps
`Llama4XExperts` in one `ParamWrapper` per weight, and each call re-parametrises the weight as `W + s * B_e A_e` for
every expert: it rebuilds an `(E, out, in)` tensor per projection per forward, and autograd computes the full
`(E, out, in)` weight gradient only to reduce it to the factors' gradients.

`Llama4XMoE` runs a PEFT-wrapped experts module through `lora_experts_forward` instead: tokens sorted by expert, one
grouped GEMM per projection for the frozen weight plus two thin grouped GEMMs for the adapter,
`x W_e^T + s (x A_e^T) B_e^T`, so the base weights get no gradient and nothing of size `(E, out, in)` is built. The
adapter is still PEFT's own: the same parameters, saved, loaded and merged by PEFT. Anything this path does not cover
(several active adapters, a merged or disabled adapter, a LoRA bias, an unexpected factor layout, experts split over
expert-parallel processes) goes through PEFT's wrapper unchanged.

Shapes: S (token, expert) pairs sorted by expert, E experts, r the rank, `in`/`out` a projection's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .experts_grouped import grouped_experts_forward, grouped_mm
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
    if getattr(module, "_is_expert_parallel", False):  # off-rank pairs: left to the experts implementation
        return None
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

    def low_rank_term(name: str, x_SI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor | None:
        low_rank = adapters.get(name)
        if low_rank is None:
            return None
        inner_SR = grouped_mm(x_SI, low_rank.down_EIR.to(x_SI.dtype), offsets_E)
        return low_rank.scaling * grouped_mm(inner_SR, low_rank.up_ERO.to(x_SI.dtype), offsets_E)

    return grouped_experts_forward(experts, hidden_TH, top_k_index_TK, top_k_weights_TK, low_rank_term)
