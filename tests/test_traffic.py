"""Decode weight traffic (`llama4x.benchmarks.traffic`): bytes read per forward call, counted from the routing taken,
against a hand count from the model's own expert loads."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama4x.benchmarks.traffic import stream_bandwidth_gbps, weight_bytes_read
from tiny import random_ids, tiny_model


def test_moe_model_reads_its_dense_weights_plus_the_experts_its_tokens_picked():
    model = tiny_model(seed=0)  # 4 MoE layers, 8 experts top-2, untied embeddings
    ids = random_ids(1, 3, seed=1)
    with torch.no_grad():
        load_LE = model(ids, output_router_logits=True).expert_load  # tokens per expert per MoE layer
        read, calls = weight_bytes_read(model, lambda: model(ids))
    experts = [layer.feed_forward.experts for layer in model.model.layers]
    expert_bytes = [(e.gate_up_proj.numel() + e.down_proj.numel()) * 4 // e.num_experts for e in experts]
    every_param = sum(p.numel() * 4 for p in model.parameters())
    dense_part = every_param - sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts) * 4
    dense_part -= model.model.embed_tokens.weight.numel() * 4  # the embedding reads 3 rows: counted as nothing
    used = (load_LE > 0).sum(dim=1).tolist()
    assert calls == 1 and 0 < sum(used) < 4 * 8, used
    assert read == dense_part + sum(n * b for n, b in zip(used, expert_bytes))


def test_dense_model_reads_every_weight_but_the_embedding_per_call():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        read, calls = weight_bytes_read(
            model, lambda: (model(random_ids(2, 4, vocab=64)), model(random_ids(2, 1, 64)))
        )
    per_call = sum(p.numel() * 4 for p in model.parameters()) - 64 * 16 * 4
    assert calls == 2 and read == 2 * per_call


def test_stream_bandwidth_is_a_positive_rate():
    assert 0.1 < stream_bandwidth_gbps(torch.device("cpu"), gib=0.0625, repeats=2) < 10_000
