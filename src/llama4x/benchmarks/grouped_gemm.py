"""The routed experts' grouped GEMMs against one dense GEMM of the same FLOPs, projection by projection.

On the H200 the Scout-shape MoE layer's grouped GEMMs took 10.8 ms where dense GEMMs of the same FLOPs take about
8 ms (`bench moe-layer --profile`): the largest part of its gap to the dense floor. This benchmark isolates them:
for each projection (`gate_up`: hidden -> 2 x expert size, `down`: expert size -> hidden) it times, forward and
forward+backward (input and weight gradients), the grouped GEMM over pairs routed uniformly at random (top-k distinct
experts per token, sorted by expert as the model sorts them) with the stacked weight in each of the two layouts
torch's kernel takes, and `x @ W` with one dense weight over the same rows:

- `grouped_out_in`: `(E, out, in)` used transposed, llama4x's (and transformers 5's default) parameter layout;
- `grouped_in_out`: `(E, in, out)` contiguous, the layout of transformers' Llama 4 checkpoints;
- `dense_mm`: the floor, `(S, in) @ (in, out)`.
"""

from __future__ import annotations

import torch

from ..expert_pairs import sort_pairs
from ..experts_grouped import grouped_mm
from .speed import Timer

PROJECTIONS = ("gate_up", "down")


def _projection_sizes(name: str, hidden: int, expert_size: int) -> tuple[int, int]:
    return (hidden, 2 * expert_size) if name == "gate_up" else (expert_size, hidden)


def bench_grouped_gemm(
    hidden: int, expert_size: int, experts: int, top_k: int, tokens: int, dtype: torch.dtype, device: torch.device,
    repeats: int = 5,
) -> dict:  # fmt: skip
    """Per projection: `forward_s` and `forward_backward_s` of the two grouped layouts and the dense GEMM (medians),
    and the rows per expert of the routing."""
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k {top_k}: expected a top-k between 1 and --experts {experts}.")
    generator = torch.Generator(device="cpu").manual_seed(0)
    index_TK = torch.rand(tokens, experts, generator=generator).argsort(dim=-1)[:, :top_k].to(device)
    offsets_E = sort_pairs(index_TK, experts).offsets_E
    rows = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    results: dict = {"rows_per_expert": {"min": int(rows.min()), "max": int(rows.max())}}
    timer = Timer(device, repeats)
    for name in PROJECTIONS:
        in_size, out_size = _projection_sizes(name, hidden, expert_size)
        results[name] = _time_projection(timer, name, tokens * top_k, in_size, out_size, offsets_E, dtype, device)
    return results


def _time_projection(
    timer: Timer, name: str, pairs: int, in_size: int, out_size: int, offsets_E: torch.Tensor, dtype: torch.dtype,
    device: torch.device,
) -> dict:  # fmt: skip
    """`forward_s` and `forward_backward_s` of one projection in the two grouped layouts and as a dense GEMM."""
    experts = offsets_E.shape[0]
    x_SI = torch.randn(pairs, in_size, device=device, dtype=dtype, requires_grad=True)
    weight_EOI = torch.randn(experts, out_size, in_size, device=device, dtype=dtype, requires_grad=True)
    weight_EIO = weight_EOI.detach().transpose(-2, -1).contiguous().requires_grad_()
    dense_IO = torch.randn(in_size, out_size, device=device, dtype=dtype, requires_grad=True)
    grad_SO = torch.randn(pairs, out_size, device=device, dtype=dtype)
    products = {
        "grouped_out_in": lambda: grouped_mm(x_SI, weight_EOI.transpose(-2, -1), offsets_E),
        "grouped_in_out": lambda: grouped_mm(x_SI, weight_EIO, offsets_E),
        "dense_mm": lambda: x_SI @ dense_IO,
    }

    def forward_backward(product):
        product().backward(gradient=grad_SO)
        for tensor in (x_SI, weight_EOI, weight_EIO, dense_IO):
            tensor.grad = None

    with torch.no_grad():
        forward = timer.run_interleaved(products, f"{name}_forward")
    both = timer.run_interleaved(
        {n: (lambda p=p: forward_backward(p)) for n, p in products.items()}, f"{name}_forward_backward"
    )
    return {"forward_s": forward, "forward_backward_s": both}
