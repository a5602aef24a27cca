"""A/B of llama4x's grouped experts (`llama4x.experts_grouped`) against transformers' `grouped_mm` experts function
in one process: both registered in llama4x's experts interface, switched per call, timed interleaved on the same
weights. Prints each pair of medians and writes them as JSON.

    PYTHONPATH=src python scripts/ab_grouped_experts.py --out benchmarks/results/ab_grouped_experts_cpu.json
"""

import argparse
import json
from pathlib import Path

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from llama4x._compat import CACHE_FIELD
from llama4x.benchmarks.overhead import _prefilled, decode_step_operators, overhead_shapes
from llama4x.benchmarks.speed import Shapes, Timer, _train_step, build_models, environment
from llama4x.configuration_llama4x import Llama4XTextConfig
from llama4x.experts_cpu import cpu_expert_loop, use_cpu_expert_loop
from llama4x.experts_grouped import GROUPED_GEMM_DTYPES, LLAMA4X_EXPERTS_FUNCTIONS
from llama4x.moe import Llama4XMoE


def transformers_grouped_mm(experts, hidden_TH, index_TK, weights_TK):
    """llama4x's `grouped_mm` before its own grouped experts: the same CPU-loop rule, then transformers' function."""
    if hidden_TH.dtype not in GROUPED_GEMM_DTYPES or use_cpu_expert_loop(experts, hidden_TH, index_TK):
        return cpu_expert_loop(experts, hidden_TH, index_TK, weights_TK)
    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, hidden_TH, index_TK, weights_TK)


LLAMA4X_EXPERTS_FUNCTIONS["transformers_grouped_mm"] = transformers_grouped_mm
ARMS = {"transformers": "transformers_grouped_mm", "llama4x": "grouped_mm"}


def time_arms(config, step, desc: str, repeats: int) -> dict[str, float]:
    def run(implementation: str):
        config._experts_implementation = implementation
        return step()

    timer = Timer(torch.device("cpu"), repeats, warmup=2)
    seconds = timer.run_interleaved({arm: (lambda i=i: run(i)) for arm, i in ARMS.items()}, desc)
    config._experts_implementation = "grouped_mm"
    print(f"{desc}: " + ", ".join(f"{arm} {s * 1e3:.2f} ms" for arm, s in seconds.items()), flush=True)
    return seconds


def moe_layer(dtype: torch.dtype, repeats: int) -> dict:
    config = Llama4XTextConfig(
        hidden_size=512, moe_intermediate_size=1024, num_local_experts=16, num_experts_per_tok=1,
        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=2, vocab_size=8,
        intermediate_size=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    block = Llama4XMoE(config).to(dtype)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02)
    x = torch.randn(1, 2048, 512, dtype=dtype)

    def forward():
        with torch.no_grad():
            block(x)

    def forward_backward():
        x.requires_grad_(True)
        block(x)[0].float().square().mean().backward()
        x.grad = None
        block.zero_grad(set_to_none=True)

    return {
        "forward_s": time_arms(config, forward, f"moe_layer_forward_{dtype}", repeats),
        "forward_backward_s": time_arms(config, forward_backward, f"moe_layer_forward_backward_{dtype}", repeats),
    }


def decode_step(repeats: int) -> dict:
    shapes = overhead_shapes()
    model = build_models(shapes, torch.bfloat16, torch.device("cpu"), which=("llama4x",))["llama4x"]
    input_ids = torch.randint(0, shapes.vocab_size, (1, 64))
    operators = {}
    for arm, implementation in ARMS.items():
        model.config._experts_implementation = implementation
        counter = decode_step_operators(model, input_ids)
        operators[arm] = {"total": sum(counter.counts.values()), **counter.counts}
    print(f"operators per decode step: {operators}")
    cache, next_ids = _prefilled(model, input_ids)

    def step():
        with torch.no_grad():
            model(next_ids, use_cache=True, **{CACHE_FIELD: cache})

    return {"operators_per_step": operators, "step_s": time_arms(model.config, step, "decode_step_bf16", repeats)}


def train_step(repeats: int) -> dict:
    shapes = Shapes()
    model = build_models(shapes, torch.float32, torch.device("cpu"), which=("llama4x",))["llama4x"]
    input_ids = torch.randint(0, shapes.vocab_size, (4, 512))
    return {"step_s": time_arms(model.config, lambda: _train_step(model, input_ids), "train_step_float32", repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/ab_grouped_experts_cpu.json")
    args = parser.parse_args()
    results = {
        "environment": environment(torch.device("cpu")),
        "decode_step": decode_step(repeats=300),
        "moe_layer_float32": moe_layer(torch.float32, repeats=15),
        "moe_layer_bfloat16": moe_layer(torch.bfloat16, repeats=15),
        "train_step": train_step(repeats=7),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
