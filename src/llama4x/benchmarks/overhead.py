"""Host overhead of eager decoding: the operators one cached decode step dispatches, per module kind.

A GPU decodes small batches eagerly at the speed of the host, not of the GPU: every operator costs microseconds of
Python, dispatch and kernel launch whatever its size (the H200 run of the performance issue: llama4x took 20 ms per
token, of which reading its active weights needs about 0.3 ms). How many operators a step dispatches does not depend
on the device, so it is counted here on any device. The step time at tiny sizes (the default shapes: the GPU
config's layers, heads and experts at hidden 64) is then almost all overhead too; on the CPU it is a proxy for that
host cost, not a GPU measurement.

Count in bfloat16 on the CPU to follow the GPU path: in float32 the CPU runs llama4x's experts through
`experts_cpu`'s loop instead of the grouped GEMM.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from .._compat import CACHE_FIELD
from .speed import GPU_SHAPES, Shapes, build_models

# Module class names -> the kind their operators are counted under (the first match, outermost module first).
KINDS = (("Attention", "attention"), ("MoE", "ffn"), ("Moe", "ffn"), ("MLP", "ffn"), ("RMSNorm", "norm"))


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active, under the kind of the innermost tracked module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.by_operator: Counter[tuple[str, str]] = Counter()
        self._kinds = ["other"]
        self._hooks = []
        for module in model.modules():
            kind = module_kind(module)
            if kind is not None:
                self._hooks.append(module.register_forward_pre_hook(lambda *_, k=kind: self._enter(k)))
                self._hooks.append(module.register_forward_hook(self._leave))

    def _enter(self, kind: str) -> None:
        # Inside an attention or FFN block, its norms (QK norm) and linears count as the block's.
        self._kinds.append(self._kinds[-1] if self._kinds[-1] != "other" else kind)

    def _leave(self, *_) -> None:
        self._kinds.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self._kinds[-1]] += 1
        self.by_operator[(self._kinds[-1], str(func.overloadpacket))] += 1
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)


def module_kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    return next((kind for part, kind in KINDS if part in name), None)


def _prefilled(model: nn.Module, input_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """A cache holding the prompt, and the next (greedy) token `(B, 1)`."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids, use_cache=True, **{CACHE_FIELD: cache}).logits
    return cache, logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_step_operators(model: nn.Module, input_ids: torch.Tensor) -> OperatorCounter:
    """The operators of one cached decode step after the prompt `input_ids (B, S)`."""
    cache, next_ids = _prefilled(model, input_ids)
    with OperatorCounter(model) as counter:
        model(next_ids, use_cache=True, **{CACHE_FIELD: cache})
    return counter


@torch.no_grad()
def decode_step_seconds(
    models: dict[str, nn.Module], input_ids: torch.Tensor, steps: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Median wall time of one cached decode step of each model (the same token fed `steps` times to a growing cache;
    the models take turns step by step, so a change of the machine's load hits them alike; CUDA synchronised)."""
    prefilled = {name: _prefilled(model, input_ids) for name, model in models.items()}
    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(warmup + steps):
        for name, model in models.items():
            cache, next_ids = prefilled[name]
            sync()
            start = time.perf_counter()
            model(next_ids, use_cache=True, **{CACHE_FIELD: cache})
            sync()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def overhead_shapes() -> Shapes:
    """The GPU config's layers, heads, experts and chunk at hidden 64: compute is negligible, overhead is not."""
    return replace(GPU_SHAPES, hidden_size=64, moe_intermediate_size=64, vocab_size=256)


def bench_decode_overhead(
    shapes: Shapes, batch: int, prompt: int, dtype: torch.dtype, device: torch.device, steps: int = 50
) -> dict:
    """Operators per decode step (total and per module kind) and the median step time, for the three models."""
    models = build_models(shapes, dtype, device)
    input_ids = torch.randint(0, shapes.vocab_size, (batch, prompt), device=device)
    counters = {name: decode_step_operators(model, input_ids) for name, model in models.items()}
    return {
        "operators_per_step": {name: sum(c.counts.values()) for name, c in counters.items()},
        "operators_by_kind": {name: dict(c.counts) for name, c in counters.items()},
        "step_ms": {name: 1e3 * s for name, s in decode_step_seconds(models, input_ids, steps).items()},
    }
