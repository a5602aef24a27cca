"""Mixture-of-experts block: router, routed experts, shared experts.

Shape legend
    T  tokens in the batch (batch * sequence, flattened)
    H  hidden size
    E  routed experts
    K  experts per token (top-k)
    I  expert intermediate size
    G  expert groups (group-limited routing)
    S  (token, expert) pairs, T * K

Forward of `Llama4XMoE`, step by step:
    1. router logits `x_TH @ W_r^T -> logits_TE`, in float32 (bf16 ties flip the top-k choice); in training the
       router input may be jittered;
    2. scores `sigmoid` or `softmax` of the logits; top-k selection -> `topk_index_TK` on the scores plus the
       balancing bias (selection only), restricted to the best groups when group-limited;
       combine weights `topk_weight_TK` are the unbiased scores (optionally renormalised and scaled);
    3. routed experts on the selected (token, expert) pairs only, through transformers' experts interface
       (`grouped_mm`, llama4x's own, sorts the pairs by expert and runs one grouped GEMM per projection, see
       `experts_grouped.py`; decode-sized float32 batches on CPU run one threaded GEMM per used expert instead, see
       `experts_cpu.py`);
       Llama 4 scales each expert's *input* by its weight, other models the output;
    4. `out = shared_experts(x) + sum_k routed_k`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from .configuration_llama4x import Llama4XTextConfig
from .experts_grouped import LLAMA4X_EXPERTS_FUNCTIONS


class Llama4XMLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, config: Llama4XTextConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation(experts_interface=LLAMA4X_EXPERTS_FUNCTIONS)
class Llama4XExperts(nn.Module):
    """Routed experts as stacked weights: `gate_up_proj (E, 2I, H)` ([gate; up]) and `down_proj (E, H, I)`.

    `forward` here is the eager reference (a loop over the experts that received tokens); the decorator
    dispatches to the implementation named by `config._experts_implementation` (`grouped_mm`, `batched_mm`, ...).
    """

    def __init__(self, config: Llama4XTextConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """`hidden_states (T, H)`, `top_k_index (T, K)`, `top_k_weights (T, K)` -> weighted expert sum `(T, H)`."""
        out_TH = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:  # a pair for another rank's expert (expert parallelism): not computed here
                continue
            token_idx, k_idx = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out_TH.index_add_(0, token_idx, (expert_out * top_k_weights[token_idx, k_idx, None]).to(out_TH.dtype))
        return out_TH


@dataclass
class Routing:
    """The router's decision for T tokens."""

    logits: torch.Tensor  # (T, E) float32
    scores: torch.Tensor  # (T, E) float32, sigmoid or softmax of the logits
    topk_index: torch.Tensor  # (T, K) chosen experts
    topk_weight: torch.Tensor  # (T, K) combine weights, float32


def router_scores(logits_TE: torch.Tensor, config: Llama4XTextConfig) -> torch.Tensor:
    """Per-expert scores in [0, 1]: sigmoid (independent per expert) or softmax (a distribution)."""
    if config.router_score_func == "sigmoid":
        return torch.sigmoid(logits_TE)
    return torch.softmax(logits_TE, dim=-1)


def limit_to_top_groups(selection_TE: torch.Tensor, config: Llama4XTextConfig) -> torch.Tensor:
    """DeepSeek-V3 node-limited routing: keep the `topk_group` groups whose top-(k / topk_group) selection
    scores sum highest; the experts of the other groups get -inf."""
    T, E = selection_TE.shape
    G, per_group = config.n_group, E // config.n_group
    grouped_TGX = selection_TE.view(T, G, per_group)
    group_score_TG = grouped_TGX.topk(config.num_experts_per_tok // config.topk_group, dim=-1).values.sum(-1)
    top_groups = group_score_TG.topk(config.topk_group, dim=-1).indices
    keep_TG = torch.zeros(T, G, dtype=torch.bool, device=selection_TE.device).scatter_(1, top_groups, True)
    return selection_TE.masked_fill(~keep_TG.repeat_interleave(per_group, dim=1), float("-inf"))


def route(logits_TE: torch.Tensor, config: Llama4XTextConfig, selection_bias_E: torch.Tensor | None = None) -> Routing:
    """Scores, top-k choice and combine weights from float32 router logits."""
    scores_TE = router_scores(logits_TE, config)
    if selection_bias_E is None and config.n_group == 1:
        # Both score functions are monotone per token, so selecting on the logits picks the same experts and
        # avoids the ties that float32 sigmoid saturation would create.
        selection_TE = logits_TE
    else:
        selection_TE = scores_TE if selection_bias_E is None else scores_TE + selection_bias_E
        if config.n_group > 1:
            selection_TE = limit_to_top_groups(selection_TE, config)
    topk_index_TK = torch.topk(selection_TE, config.num_experts_per_tok, dim=-1).indices
    topk_weight_TK = scores_TE.gather(-1, topk_index_TK)
    if config.norm_topk_prob:
        topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if config.routed_scaling_factor != 1.0:
        topk_weight_TK = topk_weight_TK * config.routed_scaling_factor
    return Routing(logits_TE, scores_TE, topk_index_TK, topk_weight_TK)


class Llama4XRouter(nn.Linear):
    """The router's linear map `(T, H) -> logits (T, E)`, computed in float32 whatever the model dtype (bf16 ties
    flip the top-k choice). A module of its own so that hooks (accelerate offloading, PEFT) see its weight used."""

    def __init__(self, config: Llama4XTextConfig):
        super().__init__(config.hidden_size, config.num_local_experts, bias=False)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TH.float(), self.weight.float())


class Llama4XMoE(nn.Module):
    """Shared experts plus top-k routed experts.

    Returns `(out (B, S, H), router_logits (T, E), topk_index (T, K))`; the model turns the last two into
    balancing losses, expert-load statistics and balancing-bias updates (see `balancing.py`).
    """

    def __init__(self, config: Llama4XTextConfig):
        super().__init__()
        self.config = config
        self.router = Llama4XRouter(config)
        self.experts = Llama4XExperts(config)
        shared_size = config.num_shared_experts * config.moe_intermediate_size
        self.shared_experts = Llama4XMLP(config, shared_size) if shared_size > 0 else None
        if config.has_router_selection_bias:
            # DeepSeek-V3's name; saved with the checkpoint, and kept in float32 (`_apply`): its steps of a small
            # `router_bias_update_rate` would round away in bfloat16.
            bias_E = torch.zeros(config.num_local_experts, dtype=torch.float32)
            self.register_buffer("e_score_correction_bias", bias_E)
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        """`module.to(dtype)`, `.half()`, ... cast the buffers too: the balancing bias goes back to float32."""
        super()._apply(fn, recurse)
        bias_E = self.e_score_correction_bias
        if bias_E is not None and bias_E.dtype != torch.float32:
            self.e_score_correction_bias = bias_E.float()
        return self

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_in_TH = x_TH.float()
        if self.training and self.config.router_jitter_noise > 0:
            noise = self.config.router_jitter_noise
            router_in_TH = router_in_TH * torch.empty_like(router_in_TH).uniform_(1.0 - noise, 1.0 + noise)
        logits_TE = self.router(router_in_TH).float()
        bias_E = None if self.e_score_correction_bias is None else self.e_score_correction_bias.float()
        routing = route(logits_TE, self.config, bias_E)
        routed_TH = self._run_experts(x_TH, routing)
        if self.shared_experts is not None:
            routed_TH = routed_TH + self.shared_experts(x_TH)
        return routed_TH.view_as(hidden_states), logits_TE, routing.topk_index

    def _run_experts(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        weight_TK = routing.topk_weight.to(x_TH.dtype)
        if not self.config.router_weight_on_input:
            return self._call_experts(x_TH, routing.topk_index, weight_TK)
        # Llama 4 scales the expert input: each (token, expert) pair becomes its own row with weight 1.
        T, K = routing.topk_index.shape
        pairs_SH = (x_TH if K == 1 else x_TH.repeat_interleave(K, dim=0)) * weight_TK.reshape(-1, 1)
        ones_S1 = weight_TK.new_ones(()).expand(T * K, 1)
        out_SH = self._call_experts(pairs_SH, routing.topk_index.reshape(-1, 1), ones_S1)
        return out_SH if K == 1 else out_SH.view(T, K, -1).sum(dim=1)

    def _call_experts(self, x_TH: torch.Tensor, index_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        if isinstance(self.experts, Llama4XExperts):
            return self.experts(x_TH, index_TK, weight_TK)
        from .lora_experts import lora_experts_forward, peft_expert_adapters  # wrapped by PEFT (LoRA)

        unwrapped = peft_expert_adapters(self.experts)
        if unwrapped is None:
            return self.experts(x_TH, index_TK, weight_TK)
        return lora_experts_forward(*unwrapped, x_TH, index_TK, weight_TK)
