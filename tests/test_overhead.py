"""Operators per eager decode step (`llama4x.benchmarks.overhead`): attributed to the module that dispatched them."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama4x.benchmarks.overhead import decode_step_operators, decode_step_seconds
from tiny import random_ids, tiny_model


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_dense_llama_step_counts_three_matmuls_per_mlp_and_four_per_attention():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    counter = decode_step_operators(model, random_ids(1, 5, vocab=64))
    assert counter.by_operator[("ffn", "aten.mm")] == 3 * 3
    assert counter.by_operator[("attention", "aten.mm")] == 4 * 3
    assert counter.by_operator[("other", "aten.mm")] == 1  # the LM head
    assert counter.counts["norm"] > 0 and sum(counter.counts.values()) == sum(counter.by_operator.values())
    assert _hooks(model) == 0


@pytest.mark.parametrize("dtype, grouped_mm_calls", [(torch.bfloat16, 2), (torch.float32, 0)])
def test_llama4x_step_takes_the_grouped_gemm_in_bfloat16_and_the_cpu_loop_in_float32(dtype, grouped_mm_calls):
    """bfloat16 on the CPU follows the GPU path (one grouped GEMM per projection); float32 takes `experts_cpu`."""
    model = tiny_model(dtype=dtype)  # 4 MoE layers
    counter = decode_step_operators(model, random_ids(1, 5))
    assert counter.by_operator[("ffn", "aten._grouped_mm")] == grouped_mm_calls * 4
    assert counter.by_operator[("ffn", "aten.topk")] == 4
    assert counter.by_operator[("attention", "aten.cat")] >= 2  # the RoPE layers join queries and keys
    assert _hooks(model) == 0


def test_decode_step_times_take_the_models_in_turn_step_by_step():
    models = {"first": tiny_model(seed=0), "second": tiny_model(seed=1)}
    calls = []
    for name, model in models.items():
        model.register_forward_hook(lambda *_, name=name: calls.append(name))
    seconds = decode_step_seconds(models, random_ids(1, 5), steps=3, warmup=1)
    assert calls == ["first", "second"] * (1 + 1 + 3), calls  # the prefills, then each step of each model in turn
    assert seconds.keys() == models.keys() and all(0 < s < 10 for s in seconds.values()), seconds
