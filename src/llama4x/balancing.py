"""Load balancing of the routed experts: balancing losses, expert-load statistics, loss-free bias updates.

The functions take what the model collects from each MoE layer: `router_logits (T, E)` in float32 and the
chosen `topk_index (T, K)`, plus `token_mask (B, S)` that is False on padding (padding never counts).

Auxiliary-loss-free balancing (DeepSeek-V3) needs no code from the user: a model registers itself here when
built, its training forward passes add each layer's tokens-per-expert counts to a pending total in place (no other
side effect, so `torch.compile(fullgraph=True)` traces them), and torch's global optimizer step hook applies one
bias update per optimizer step that touched the model's parameters — with gradient accumulation, from all
micro-batches of that step. Eval and inference never update it.
"""

import math
import weakref

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

from .configuration_llama4x import Llama4XTextConfig
from .moe import router_scores


def token_mask_from_attention_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """`(B, S)` bool mask of the current (non-padding) tokens from a 2-D padding mask over past + current."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:].bool()


def expert_load(topk_index_TK: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens routed to each expert, `(E,)` int64; padding excluded. Each (token, expert) pair adds its token's
    mask value, so every shape is static (no boolean indexing): it compiles without a graph break."""
    counts_TK = (
        torch.ones_like(topk_index_TK, dtype=torch.int64)
        if token_mask is None
        else token_mask.reshape(-1, 1).to(torch.int64).expand_as(topk_index_TK)
    )
    load_E = torch.zeros(num_experts, dtype=torch.int64, device=topk_index_TK.device)
    return load_E.scatter_add_(0, topk_index_TK.reshape(-1), counts_TK.reshape(-1))


def load_balancing_loss(
    logits_TE: torch.Tensor,
    topk_index_TK: torch.Tensor,
    token_mask_BS: torch.Tensor,
    config: Llama4XTextConfig,
) -> torch.Tensor:
    """Switch/GShard loss `E * sum_i f_i * P_i`: `f_i` the fraction of (token, expert) assignments that go to
    expert i, `P_i` its mean routing probability (sigmoid scores normalised per token, as DeepSeek-V3).
    `router_aux_loss_type="sequence"` computes it per sequence and averages over sequences."""
    B, S = token_mask_BS.shape
    E, K = config.num_local_experts, config.num_experts_per_tok
    probs_TE = router_scores(logits_TE, config)
    if config.router_score_func == "sigmoid":
        probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    # (T, E) 1 where the token chose the expert; a scatter, not `one_hot`, which reads the ids back to check them
    assigned_TE = torch.zeros_like(probs_TE).scatter_(1, topk_index_TK, 1.0)
    mask_BS1 = token_mask_BS.reshape(B, S, 1).to(probs_TE.dtype)
    dims = (0, 1) if config.router_aux_loss_type == "global" else (1,)
    tokens = mask_BS1.sum(dims)  # () or (B, 1)
    f = (assigned_TE.view(B, S, E) * mask_BS1).sum(dims) / (tokens * K).clamp_min(1)
    p = (probs_TE.view(B, S, E) * mask_BS1).sum(dims) / tokens.clamp_min(1)
    loss = E * (f * p).sum(-1)
    if config.router_aux_loss_type == "sequence":  # average over the sequences that have tokens (0 if none)
        has_tokens = (tokens.reshape(-1) > 0).to(loss.dtype)
        loss = (loss * has_tokens).sum() / has_tokens.sum().clamp_min(1)
    return loss


def router_z_loss(logits_TE: torch.Tensor, token_mask_BS: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over (non-padding) tokens of `logsumexp(logits)^2`."""
    mask_T = token_mask_BS.reshape(-1).to(logits_TE.dtype)
    return (torch.logsumexp(logits_TE, dim=-1).square() * mask_T).sum() / mask_T.sum().clamp_min(1)


def balancing_losses(
    router_logits: list[torch.Tensor],
    topk_indices: list[torch.Tensor],
    token_mask_BS: torch.Tensor,
    config: Llama4XTextConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(aux_loss, z_loss)`, each averaged over the MoE layers."""
    aux = torch.stack(
        [load_balancing_loss(lg, ix, token_mask_BS, config) for lg, ix in zip(router_logits, topk_indices)]
    )
    z = torch.stack([router_z_loss(lg, token_mask_BS) for lg in router_logits])
    return aux.mean(), z.mean()


def max_violation(load_LE: torch.Tensor) -> torch.Tensor:
    """`max_load / mean_load - 1` per layer (0 is perfect balance; 0 for a layer that saw no tokens)."""
    load_LE = load_LE.double()
    mean = load_LE.mean(dim=-1)
    return torch.where(mean > 0, load_LE.amax(dim=-1) / mean.clamp_min(1e-12) - 1, torch.zeros_like(mean))


def load_entropy(load_LE: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution of tokens over experts per layer, divided by `log(E)` (1 = uniform; a single
    expert is uniform)."""
    load_LE = load_LE.double()
    num_experts = load_LE.shape[-1]
    if num_experts == 1:
        return load_LE.new_ones(load_LE.shape[:-1])
    p = load_LE / load_LE.sum(dim=-1, keepdim=True).clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1)
    return entropy / math.log(num_experts)


def routing_stats(load_LE: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer statistics of an expert-load matrix `(num_moe_layers, E)`."""
    return {"expert_load": load_LE, "max_violation": max_violation(load_LE), "load_entropy": load_entropy(load_LE)}


@torch.no_grad()
def update_balancing_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3: `b_i += rate * sign(mean_load - load_i)`; overloaded experts become less likely picks."""
    load_E = load_E.to(bias_E.device, torch.float64)
    bias_E += (rate * torch.sign(load_E.mean() - load_E)).to(bias_E.dtype)


def all_reduce_load(load_LE: torch.Tensor) -> torch.Tensor:
    """Sum the pending loads of all data-parallel processes, so every process applies the same bias update."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(load_LE)
    return load_LE


# torch's optimizer hook is process-global, so the set of models it serves is too (weak references only). Models
# join it when built or copied, not in their forward, so that a compiled forward has no Python side effect here.
_balanced_models: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_hook_handle = None


def watch_for_bias_updates(model: torch.nn.Module) -> None:
    """After each optimizer step over `model`'s routers, call `model.apply_balancing_bias_update()` when its config
    has a bias update rate and training forward passes have counted expert loads."""
    global _hook_handle
    _balanced_models.add(model)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    waiting = [
        m for m in _balanced_models if m.config.router_bias_update_rate > 0 and m._expert_load_totals is not None
    ]
    if not waiting:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in waiting:
        if not any(id(p) in stepped for p in model.parameters()):
            continue  # an optimizer of another model
        # The biases move with the routing: only while the routers' own weights train. Under LoRA (PEFT) the base
        # routers are frozen, and an adapter could not save the biases anyway.
        if any(id(weight) in stepped for weight in model.router_weights()):
            model.apply_balancing_bias_update()
        else:
            model.drop_pending_loads()
