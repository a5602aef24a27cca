"""The (token, expert) pairs of a routing, sorted by expert: what every grouped experts computation starts from.

Shapes: T tokens, K experts per token, S = T * K pairs, E experts, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertPairs:
    """The pairs of `top_k_index (T, K)` in expert order (ties in token order)."""

    order_S: torch.Tensor  # (S,) position of each sorted pair in the flattened (T * K) routing
    token_S: torch.Tensor  # (S,) the token of each sorted pair
    offsets_E: torch.Tensor  # (E,) int32: the sorted pairs of expert e are rows offsets[e-1]:offsets[e]
    top_k: int

    def gather_rows(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        """Each sorted pair's token row `(S, H)`. At top-1 the pairs are a permutation of the tokens: `index_select`,
        whose backward scatters onto distinct rows, 2-3x faster forward+backward on CPU than advanced indexing, whose
        backward sorts to accumulate (measured at 8192 x 512). With K > 1 tokens repeat, and that sorted
        accumulation keeps the gradient deterministic on CUDA."""
        if self.top_k == 1:
            return hidden_TH.index_select(0, self.token_S)
        return hidden_TH[self.token_S]

    def gather_weights(self, top_k_weights_TK: torch.Tensor) -> torch.Tensor:
        """The combine weight of each sorted pair `(S, 1)`."""
        return top_k_weights_TK.reshape(-1)[self.order_S, None]

    def sum_per_token(self, y_SH: torch.Tensor) -> torch.Tensor:
        """`(S, H)` rows in expert order -> `(T, H)`, each token's K rows summed.

        A copy to routing order and a sum over K, not an `index_add_`: deterministic on CUDA (no atomics) and the K
        rows are summed in float32 by `sum`, as transformers' `grouped_mm` does."""
        routing_order_SH = torch.empty_like(y_SH).index_copy_(0, self.order_S, y_SH)
        if self.top_k == 1:
            return routing_order_SH
        return routing_order_SH.view(-1, self.top_k, y_SH.shape[-1]).sum(dim=1)


def sort_pairs(top_k_index_TK: torch.Tensor, num_experts: int) -> ExpertPairs:
    """Sort the pairs by expert; no host read-back (offsets by `searchsorted`, not `bincount`)."""
    K = top_k_index_TK.shape[1]
    expert_S, order_S = torch.sort(top_k_index_TK.reshape(-1), stable=True)
    experts_E = torch.arange(num_experts, device=expert_S.device)
    offsets_E = torch.searchsorted(expert_S, experts_E, right=True, out_int32=True)
    return ExpertPairs(order_S, order_S if K == 1 else order_S // K, offsets_E, K)
