"""Weight traffic of decoding: the bytes of weights each forward call reads, measured from the routing it took.

Small-batch decoding is bound by reading the weights, not by arithmetic. A dense model reads every weight per step
(the input embedding only for the batch's rows, counted as nothing). An MoE model reads its non-expert weights plus
the routed experts its tokens picked: `weight_bytes_read` counts the distinct experts of every MoE call with forward
hooks. transformers' Llama 4 runs every expert for every token, so it reads all of them, as a dense model does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..moe import Llama4XExperts, Llama4XMoE


def weight_bytes_read(model: nn.Module, run: Callable[[], object]) -> tuple[int, int]:
    """`(bytes, forward calls)` of the weights that `run()` reads through `model`."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    experts = [m for m in model.modules() if isinstance(m, Llama4XExperts)]
    routed = {id(p) for e in experts for p in e.parameters()}
    always = sum(_bytes(p) for p in model.parameters() if id(p) not in routed and (tied or p is not embedding))
    expert_bytes = [sum(_bytes(p) for p in e.parameters()) // e.num_experts for e in experts]

    calls, distinct = [0], [0] * len(experts)
    hooks = [model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))]
    moe_blocks = [m for m in model.modules() if isinstance(m, Llama4XMoE)]
    for i, block in enumerate(moe_blocks):
        hooks.append(block.register_forward_hook(_count_distinct_experts(distinct, i)))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls[0] * always + sum(n * size for n, size in zip(distinct, expert_bytes)), calls[0]


def _count_distinct_experts(distinct: list[int], layer: int):
    def hook(_module, _inputs, outputs):
        topk_index = outputs[2]  # Llama4XMoE returns (out, router_logits, topk_index)
        distinct[layer] += topk_index.unique().numel()

    return hook


def _bytes(param: torch.Tensor) -> int:
    return param.numel() * param.element_size()


def stream_bandwidth_gbps(device: torch.device, gib: float = 0.5, repeats: int = 5) -> float:
    """The device's read bandwidth in GB/s: the best of `repeats` sums over a `gib`-GiB float32 tensor."""
    data = torch.ones(int(gib * 2**30) // 4, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        data.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9
