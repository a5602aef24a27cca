"""Useful FLOPs of the benchmarked work, the measured matmul peak of a device, and the achieved rate against it.

Only *active* work counts: a token's matmuls with the weights it uses (attention projections, its top-k routed
experts, the shared expert, dense FFNs, the LM head; not the embedding lookup) and its attention scores and
values. A multiply-add is 2 FLOPs; a backward pass is 2x its forward, so forward+backward is 3x. transformers'
Llama 4 multiplies every token by every expert: its extra work is waste and is not counted, so its TFLOP/s shows
how much of the device it spends usefully.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..moe import Llama4XExperts


def active_matmul_params(model: nn.Module, top_k: int = 1) -> int:
    """Weights a token multiplies with: every matrix except the input embeddings, with each stacked routed-expert
    weight counted for `top_k` of its experts."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    total = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in embeddings or param.dim() < 2:
                continue
            total += param.numel() * top_k // param.shape[0] if isinstance(module, Llama4XExperts) else param.numel()
    return total


def attention_flops_per_token(config, sequence: int) -> float:
    """Forward FLOPs of one token's scores and weighted values over all layers, averaged over a causal sequence:
    `4 * heads * head_dim * keys` per layer, keys = (sequence + 1) / 2 for global layers, the mean within a chunk
    for chunked ones."""
    width = config.num_attention_heads * config.head_dim
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    chunk = getattr(config, "attention_chunk_size", None) or sequence
    total = 0.0
    for kind in layer_types:
        if kind == "chunked_attention" and chunk < sequence:
            full_chunks, tail = divmod(sequence, chunk)
            keys = (full_chunks * chunk * (chunk + 1) / 2 + tail * (tail + 1) / 2) / sequence
        else:
            keys = (sequence + 1) / 2
        total += 4 * width * keys
    return total


def train_step_flops(model: nn.Module, config, top_k: int, batch: int, sequence: int) -> float:
    """Forward + backward FLOPs of a training step on `batch x sequence` tokens."""
    per_token = 2 * active_matmul_params(model, top_k) + attention_flops_per_token(config, sequence)
    return 3 * per_token * batch * sequence


def moe_layer_flops(hidden: int, expert_size: int, experts: int, top_k: int, tokens: int, shared: int = 1) -> float:
    """Forward FLOPs of one MoE block: router, `top_k` routed plus `shared` SwiGLU experts per token."""
    return 2 * tokens * (hidden * experts + (top_k + shared) * 3 * hidden * expert_size)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """Measured rate of large square matmuls on `device` in `dtype` (median), the MFU denominator."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = []
    for index in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:  # warm-up
            seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds) / 1e12


def achieved(flops: dict[str, float], seconds: dict[str, float], peak_tflops: float) -> dict[str, dict[str, float]]:
    """TFLOP/s of each model's useful work and its fraction of the measured peak (MFU)."""
    tflops = {name: flops[name] / s / 1e12 for name, s in seconds.items()}
    return {"tflops": tflops, "mfu": {name: value / peak_tflops for name, value in tflops.items()}}
