"""Knowledge-distillation losses: forward / reverse KL, generalized JSD, top-k sparse KL, label mixing, hidden states.

Shapes: B batch, S sequence length, V vocabulary, K teacher logits kept per position, N counted positions, H hidden.

Every loss compares, at each counted position t, the two models' distributions over the token t + 1 (the logits are
the models' unshifted outputs, as a causal LM returns them; labels are the input ids, -100 where nothing is learned,
as the models' own `labels`). Position t counts when `labels[t + 1] != -100` and, with an attention mask, both
`mask[t]` and `mask[t + 1]` are 1: padding and prompt tokens (labels -100) are left out. Losses are means over the
counted positions.

With temperature T, `p = softmax(teacher / T)` and `q = softmax(student / T)`; each distillation term is multiplied by
T^2 so its gradients keep their scale when T changes (Hinton et al., 2015):

    forward_kl   KL(p || q) = sum_v p_v (log p_v - log q_v)                   (mean-seeking; classic KD)
    reverse_kl   KL(q || p) = sum_v q_v (log q_v - log p_v)                   (mode-seeking)
    jsd          beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q   (GKD's generalized JSD;
                 beta = 0.5 is the symmetric Jensen-Shannon divergence; 0 < beta < 1)
    topk_kl      KL(p_K || q): p_K keeps the teacher's K largest logits and renormalises over them (zero elsewhere),
                 q is the student's full distribution; only the K teacher logits are needed (offline caches store
                 them); K >= V gives forward_kl.

`alpha` mixes the distillation term with the label cross-entropy (T = 1): `alpha * kd + (1 - alpha) * ce`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "topk_kl")


class TeacherTopK(NamedTuple):
    """A teacher's largest logits per position, in descending order: `values (B, S, K)` and their token ids
    `indices (B, S, K)`. With K equal to the vocabulary size it is the whole distribution."""

    values: torch.Tensor
    indices: torch.Tensor


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits lose the small probabilities KL weighs); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def counted_positions(
    labels: torch.Tensor | None, mask: torch.Tensor | None, shape: Sequence[int], device: torch.device
) -> torch.Tensor:
    """`(B, S - 1)` bool: position t counts when its target token t + 1 is supervised and neither is padding."""
    B, S = shape
    valid = torch.ones(B, S - 1, dtype=torch.bool, device=device)
    if labels is not None:
        valid &= labels[:, 1:].to(device) != IGNORE_INDEX
    if mask is not None:
        mask = mask.to(device).bool()
        valid &= mask[:, 1:] & mask[:, :-1]
    return valid


def _xlogy_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`sum_v a_v (log a_v - log b_v)` with `a_v = 0` terms contributing 0 (log a = -inf for a truncated teacher)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def forward_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """`KL(p || q)` per position from log-probabilities `(N, V)`; teacher log-probs may be -inf."""
    return _xlogy_diff(teacher_logprobs, student_logprobs)


def reverse_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """`KL(q || p)` per position from log-probabilities `(N, V)`."""
    return _xlogy_diff(student_logprobs, teacher_logprobs)


def generalized_jsd(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """`beta KL(p || m) + (1 - beta) KL(q || m)`, `m = beta p + (1 - beta) q`, per position; 0 < beta < 1."""
    log_m = torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log(1.0 - beta))
    return beta * _xlogy_diff(teacher_logprobs, log_m) + (1.0 - beta) * _xlogy_diff(student_logprobs, log_m)


def topk_kl(topk_values: torch.Tensor, topk_indices: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """`KL(p_K || q)` per position: the teacher's top-K logits `(N, K)` (already divided by the temperature)
    renormalised over themselves, against the student's full log-probabilities `(N, V)` at those tokens."""
    teacher_logprobs_NK = F.log_softmax(topk_values, dim=-1)
    student_logprobs_NK = student_logprobs.gather(-1, topk_indices.long())
    return (teacher_logprobs_NK.exp() * (teacher_logprobs_NK - student_logprobs_NK)).sum(-1)


def _check_arguments(kind: str, temperature: float, alpha: float, beta: float, top_k: int | None) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"Invalid distillation loss `kind`={kind!r}: expected one of {LOSS_KINDS}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"Invalid `temperature`={temperature!r}: expected a positive finite number.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Invalid `alpha`={alpha!r}: expected a weight in [0, 1] (1: distillation only).")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"Invalid `beta`={beta!r}: expected 0 < beta < 1 for `jsd` (its limits are forward_kl / reverse_kl up to "
            "scale; use those kinds)."
        )
    if kind == "topk_kl" and (top_k is None or top_k < 1):
        raise ValueError(f"Invalid `top_k`={top_k!r}: `topk_kl` needs a number of teacher logits >= 1.")


def _teacher_term(
    kind: str,
    teacher: torch.Tensor | TeacherTopK,
    student_logprobs_NV: torch.Tensor,
    valid_BS: torch.Tensor,
    temperature: float,
    beta: float,
    top_k: int | None,
) -> torch.Tensor:
    """The per-position distillation term `(N,)` (before the T^2 factor)."""
    V = student_logprobs_NV.shape[-1]
    top_k = min(top_k, V) if top_k is not None else None
    if isinstance(teacher, TeacherTopK):
        values_NK = _wide(teacher.values[:, :-1][valid_BS]) / temperature
        indices_NK = teacher.indices[:, :-1][valid_BS].long()
        cached = values_NK.shape[-1]
        if kind == "topk_kl":
            if top_k > cached:
                raise ValueError(f"`top_k`={top_k} exceeds the {cached} teacher logits given per position.")
            return topk_kl(values_NK[:, :top_k], indices_NK[:, :top_k], student_logprobs_NV)
        if cached < V:
            raise ValueError(
                f"The {kind!r} loss needs the teacher's whole distribution, but only its top {cached} of {V} logits "
                "were given: use kind='topk_kl', or keep all of them (offline caches store top_k = vocab_size for "
                "the full-distribution losses)."
            )
        full_NV = torch.full_like(student_logprobs_NV, float("-inf")).scatter(-1, indices_NK, values_NK)
        teacher_logprobs_NV = F.log_softmax(full_NV, dim=-1)
    else:
        teacher_NV = _wide(teacher[:, :-1][valid_BS]) / temperature
        if kind == "topk_kl":
            top = teacher_NV.topk(top_k, dim=-1)
            return topk_kl(top.values, top.indices, student_logprobs_NV)
        teacher_logprobs_NV = F.log_softmax(teacher_NV, dim=-1)
    if kind == "forward_kl" or kind == "topk_kl":
        return forward_kl(teacher_logprobs_NV, student_logprobs_NV)
    if kind == "reverse_kl":
        return reverse_kl(teacher_logprobs_NV, student_logprobs_NV)
    return generalized_jsd(teacher_logprobs_NV, student_logprobs_NV, beta)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TeacherTopK | None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`alpha * T^2 * kd + (1 - alpha) * ce`, averaged over the counted positions (see the module docstring).

    Args:
        student_logits: `(B, S, V)` unshifted logits of the student.
        teacher_logits: `(B, S, V)` unshifted logits of the teacher, or a `TeacherTopK` of its largest logits (an
            offline cache); None only with `alpha == 0`.
        labels: `(B, S)` target ids, -100 where nothing is learned (prompt tokens, padding). Needed when `alpha < 1`.
        mask: `(B, S)` attention mask (1 = token, 0 = padding), or None.
        kind: one of `LOSS_KINDS`; temperature: T > 0; alpha: weight of the distillation term in [0, 1];
        beta: the `jsd` mixture weight; top_k: teacher logits kept by `topk_kl`.
        return_parts: also return `{"kd_loss": ..., "ce_loss": ...}` (unweighted, detached; kd includes T^2).

    Raises:
        ValueError: for an unknown `kind`, out-of-range `temperature` / `alpha` / `beta` / `top_k`, missing labels or
            teacher logits, mismatched vocabularies, or a full-distribution `kind` given only a teacher's top-K.
    """
    _check_arguments(kind, temperature, alpha, beta, top_k)
    B, S, V = student_logits.shape
    valid_BS = counted_positions(labels, mask, (B, S), student_logits.device)
    count = valid_BS.sum().clamp_min(1)
    student_NV = _wide(student_logits[:, :-1][valid_BS])  # (N, V)
    zero = student_NV.sum() * 0.0  # keeps the graph (and dtype) when a term is absent
    kd = ce = zero
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("`teacher_logits` are needed when `alpha` > 0.")
        teacher_V = teacher_logits.shape[-1] if not isinstance(teacher_logits, TeacherTopK) else None
        if teacher_V is not None and teacher_V != V:
            raise ValueError(f"Teacher logits have vocab_size={teacher_V}, student logits vocab_size={V}.")
        student_logprobs_NV = F.log_softmax(student_NV / temperature, dim=-1)
        term_N = _teacher_term(kind, teacher_logits, student_logprobs_NV, valid_BS, temperature, beta, top_k)
        kd = term_N.sum() / count * temperature**2
    if alpha < 1:
        if labels is None:
            raise ValueError("`labels` are needed when `alpha` < 1 (the label cross-entropy term).")
        targets_N = labels[:, 1:].to(student_NV.device)[valid_BS]
        ce = F.cross_entropy(student_NV, targets_N, reduction="sum") / count
    loss = alpha * kd + (1.0 - alpha) * ce
    if return_parts:
        return loss, {"kd_loss": kd.detach(), "ce_loss": ce.detach()}
    return loss


class HiddenStateAligner(nn.Module):
    """MSE between student and teacher hidden states, through a learned linear projection of the student's states
    when the widths differ (identity otherwise).

    `pairs` lists `(student_index, teacher_index)` into the models' `hidden_states` tuples (index 0 = embeddings,
    i = output of layer i, -1 / last = the final, normalised states). The loss is the mean over pairs of the squared
    error averaged over the hidden dimension and the counted positions (same positions as `distillation_loss`).
    """

    def __init__(self, student_width: int, teacher_width: int, pairs: Sequence[tuple[int, int]] = ((-1, -1),)):
        super().__init__()
        if not pairs:
            raise ValueError("`pairs` must name at least one (student_index, teacher_index) pair of hidden states.")
        self.pairs = [tuple(pair) for pair in pairs]
        self.projections = nn.ModuleList(
            nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width, bias=False)
            for _ in self.pairs
        )

    def forward(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        teacher_hidden_states: Sequence[torch.Tensor],
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        first = student_hidden_states[0]
        valid_BS = counted_positions(labels, mask, first.shape[:2], first.device)
        count = valid_BS.sum().clamp_min(1)
        total = first.new_zeros((), dtype=torch.float32)
        for (s, t), projection in zip(self.pairs, self.projections):
            student_NH = projection(student_hidden_states[s][:, :-1][valid_BS])
            teacher_NH = teacher_hidden_states[t].to(first.device)[:, :-1][valid_BS]
            total = total + ((student_NH.float() - teacher_NH.float()) ** 2).mean(-1).sum() / count
        return total / len(self.pairs)
