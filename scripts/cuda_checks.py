"""CUDA correctness checks, run on a GPU machine (CI has none): parity, experts kernels, cache, compiled decoding.

PYTHONPATH=src python scripts/cuda_checks.py --out results/
PYTHONPATH=src:tests python scripts/cuda_checks.py --device cpu --out /tmp/cc   # dry run before a GPU session (~1 min)

`compiled_decode.same_tokens` compares bfloat16 greedy tokens of the dynamic-cache and the compiled static-cache
paths over 128 steps: near-ties in bfloat16 can make them part ways (they do on the CPU, where transformers does not
compile at all); the float32 equality is `tests/test_generation.py`'s.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig, Llama4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from llama4x import Llama4XForCausalLM  # noqa: E402
from llama4x.conversion import state_dict_from_llama4, text_config_from_llama4  # noqa: E402
from test_conversion import llama4_text_config  # noqa: E402
from tiny import random_ids, tiny_model  # noqa: E402


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def parity(dtype: torch.dtype, device: str) -> float:
    torch.manual_seed(0)
    reference = Llama4ForCausalLM(llama4_text_config(num_experts_per_tok=2)).to(device, dtype).eval()
    model = Llama4XForCausalLM(text_config_from_llama4(reference.config)).to(device, dtype).eval()
    model.load_state_dict(state_dict_from_llama4(reference.state_dict()))
    ids = random_ids(2, 40).to(device)
    with torch.no_grad():
        return max_rel_diff(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def experts_agreement(device: str) -> dict:
    logits = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        model = tiny_model(num_local_experts=16, moe_intermediate_size=64).to(device, torch.bfloat16)
        model.set_experts_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=random_ids(4, 64).to(device)).logits
    return {impl: max_rel_diff(value, logits["eager"]) for impl, value in logits.items()}


def activation_lora_vs_peft(dtype: torch.dtype, device: str) -> dict:
    """Routed-expert LoRA: llama4x's grouped activation path vs PEFT's own ParamWrapper forward, outputs and grads."""
    from llama4x.lora_experts import lora_experts_forward, peft_expert_adapters
    from test_lora import lora_model
    from test_lora_experts import first_moe, routed_inputs

    peft_model = lora_model(("routed_experts",)).to(device, dtype)
    moe = first_moe(peft_model)
    x, index, weight = (t.to(device) for t in routed_inputs(moe, tokens=256))
    x = x.detach().to(dtype).requires_grad_(True)
    results = {}
    for name, run in {
        "llama4x": lambda: lora_experts_forward(*peft_expert_adapters(moe.experts), x, index, weight.to(dtype)),
        "peft": lambda: moe.experts(x, index, weight.to(dtype)),
    }.items():
        out = run()
        out.float().square().sum().backward()
        grads = [p.grad.clone() for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None]
        results[name] = (out.detach(), grads, x.grad.clone())
        peft_model.zero_grad(set_to_none=True)
        x.grad = None
    ours, peft = results["llama4x"], results["peft"]
    return {
        "computed_on": str(ours[0].device),  # H200 run 3's maxima equalled the CPU dry run's to every digit
        "output_max_rel": max_rel_diff(ours[0], peft[0]),
        "input_grad_max_rel": max_rel_diff(ours[2], peft[2]),
        "adapter_grads_max_rel": max(max_rel_diff(a, b) for a, b in zip(ours[1], peft[1])),
    }


def cache_equals_recompute(device: str) -> bool:
    model = tiny_model().to(device)
    ids = random_ids(2, 30).to(device)
    kwargs = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    return torch.equal(
        model.generate(input_ids=ids, **kwargs), model.generate(input_ids=ids, use_cache=False, **kwargs)
    )


def blockwise_vs_eager(device: str, length: int = 4096) -> float:
    model = tiny_model(attention_chunk_size=512, max_position_embeddings=8192).to(device)
    ids = random_ids(1, length).to(device)
    out = {}
    with torch.no_grad():
        for kernel in ("eager", "sdpa"):
            model.set_attn_implementation(kernel)
            out[kernel] = model(input_ids=ids).logits
    return max_rel_diff(out["sdpa"], out["eager"])


def compiled_decode(device: str) -> dict:
    model = tiny_model(
        hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128, moe_intermediate_size=1024,
        intermediate_size=2048, num_local_experts=16, num_experts_per_tok=1, vocab_size=32000,
        attention_chunk_size=128, max_position_embeddings=4096,
    ).to(device, torch.bfloat16)  # fmt: skip
    ids = random_ids(1, 64, vocab=32000).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    kwargs = {"max_new_tokens": 128, "min_new_tokens": 128, "do_sample": False, "pad_token_id": 0}
    result = {}
    eager = model.generate(input_ids=ids, **kwargs)
    sync()
    start = time.perf_counter()
    model.generate(input_ids=ids, **kwargs)
    sync()
    result["eager_tok_s"] = 128 / (time.perf_counter() - start)
    compile_config = CompileConfig(fullgraph=True)
    start = time.perf_counter()
    compiled = model.generate(input_ids=ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    result["first_compiled_call_s"] = time.perf_counter() - start
    for _ in range(2):
        sync()
        start = time.perf_counter()
        compiled = model.generate(
            input_ids=ids, cache_implementation="static", compile_config=compile_config, **kwargs
        )
        sync()
        result["compiled_tok_s"] = 128 / (time.perf_counter() - start)
    result["compiled_call_used"] = hasattr(model, "_compiled_call")
    result["same_tokens"] = torch.equal(eager, compiled)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cuda", help="cuda; cpu for a dry run of the script before a GPU session")
    args = parser.parse_args(argv)
    device = args.device
    checks = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "parity_fp32_max_rel": parity(torch.float32, device),
        "parity_bf16_max_rel": parity(torch.bfloat16, device),
        "experts_bf16_max_rel_vs_eager": experts_agreement(device),
        "cache_equals_recompute": cache_equals_recompute(device),
        "blockwise_sdpa_vs_eager_4k_fp32_max_rel": blockwise_vs_eager(device),
        "activation_lora_vs_peft_fp32": activation_lora_vs_peft(torch.float32, device),
        "activation_lora_vs_peft_bf16": activation_lora_vs_peft(torch.bfloat16, device),
    }
    print(json.dumps(checks, indent=2), flush=True)
    checks["compiled_decode"] = compiled_decode(device)
    print(json.dumps(checks, indent=2), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cuda_checks.json").write_text(json.dumps(checks, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
