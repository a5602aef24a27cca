"""Speed and memory of llama4x beside transformers' Llama 4 and a dense Llama with the same active parameters.

Every benchmark builds the three models in one process from the same shapes (llama4x and Llama 4 share the
very same weights through `llama4x.conversion`), times them interleaved, and reports medians of repeats:

- `moe_layer`: one MoE block, forward and forward+backward, against a dense SwiGLU as wide as the active experts;
- `train`: whole-model forward+backward tokens/s;
- `decode`: `generate` tokens/s after a prompt, batch 1 and 8, and the weight bytes each model read per step;
- `long_context`: prefill time and peak memory over sequence lengths (only the last position's logits);
- `kv_cache`: KV-cache bytes after a prefill, per layer kind (chunked layers bounded by the chunk);
- `lora_train`: llama4x training step with PEFT LoRA on the routed experts / attention vs full fine-tuning.

On CUDA the timings use CUDA events and peak memory is `torch.cuda.max_memory_allocated` above the weights (on CPUs
the peak of the tensor allocations that the profiler records). The MoE-layer and training benchmarks also report the
achieved TFLOP/s of the useful (active) work and the MFU against the device's measured matmul peak (`flops.py`).
"""

import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import CompileConfig, Llama4ForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from ..configuration_llama4x import Llama4XTextConfig
from ..conversion import state_dict_to_llama4, text_config_to_llama4, text_tensor_to_llama4
from ..modeling_llama4x import Llama4XForCausalLM
from ..moe import Llama4XMLP, Llama4XMoE
from .flops import achieved, matmul_peak_tflops, moe_layer_flops, train_step_flops
from .traffic import stream_bandwidth_gbps, weight_bytes_read

MODELS = ("llama4x", "transformers_llama4", "dense_llama")


@dataclass
class Shapes:
    """A whole-model benchmark configuration (defaults: the CPU config of the performance issue)."""

    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    moe_intermediate_size: int = 1024
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    vocab_size: int = 32000
    attention_chunk_size: int = 256
    no_rope_layer_interval: int = 4

    def llama4x_config(self) -> Llama4XTextConfig:
        return Llama4XTextConfig(
            **asdict(self),
            head_dim=self.hidden_size // self.num_attention_heads,
            intermediate_size=2 * self.moe_intermediate_size,
            max_position_embeddings=1 << 21,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        )

    def dense_config(self) -> LlamaConfig:
        """Llama with the same attention and an FFN as wide as the active experts (routed top-k + shared)."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=(self.num_experts_per_tok + 1) * self.moe_intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=1 << 21,
        )


@dataclass
class Timer:
    """Median wall time of a callable, synchronising CUDA around it.

    On CUDA it also records the host time of each call (`host_samples`): how long the host took to queue the call's
    kernels. A host time close to the device time means the host set the pace, not the GPU."""

    device: torch.device
    repeats: int = 5
    warmup: int = 1
    samples: dict[str, list[float]] = field(default_factory=dict)
    host_samples: dict[str, list[float]] = field(default_factory=dict)

    def measure(self, name: str, fn: Callable[[], object]) -> None:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            host_start = time.perf_counter()
            fn()
            self.host_samples.setdefault(name, []).append(time.perf_counter() - host_start)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            start_time = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start_time
        self.samples.setdefault(name, []).append(seconds)

    def host_medians(self, desc: str) -> dict[str, float]:
        """Median host times of the calls `run_interleaved(..., desc)` timed on CUDA (empty elsewhere)."""
        prefix = f"{desc}/"
        return {
            name.removeprefix(prefix): statistics.median(seconds)
            for name, seconds in self.host_samples.items()
            if name.startswith(prefix)
        }

    def run_interleaved(self, fns: dict[str, Callable[[], object]], desc: str) -> dict[str, float]:
        """Warm each up, then time them in turn `repeats` times; medians in seconds."""
        for fn in fns.values():
            for _ in range(self.warmup):
                fn()
        for _ in tqdm(range(self.repeats), desc=desc, leave=False):
            for name, fn in fns.items():
                self.measure(f"{desc}/{name}", fn)
        return {name: statistics.median(self.samples[f"{desc}/{name}"]) for name in fns}


def _peak_memory_gib(device: torch.device, fn: Callable[[], object]) -> float:
    """Peak memory of the tensors allocated during `fn`, above the memory in use before it: CUDA's allocator
    statistics, or on CPUs the allocations and frees the profiler records (not the process's resident set, which
    depends on what the C allocator kept from earlier runs: the same prefill read 0.004 to 0.12 GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**30
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    in_use = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        in_use += event.nbytes()  # negative for a free
        peak = max(peak, in_use)
    return peak / 2**30


def build_models(shapes: Shapes, dtype: torch.dtype, device: torch.device, which=MODELS) -> dict[str, torch.nn.Module]:
    """The three models; Llama 4 gets llama4x's weights through the conversion."""
    torch.manual_seed(0)
    models = {}
    with _building_on(device, dtype):  # multi-billion-parameter models: initialise in place, not on the CPU
        ours = Llama4XForCausalLM(shapes.llama4x_config()).eval()
        if "transformers_llama4" in which:
            reference = Llama4ForCausalLM(text_config_to_llama4(ours.config)).eval()
            reference.load_state_dict(state_dict_to_llama4(ours.state_dict()))
            models["transformers_llama4"] = reference
        if "dense_llama" in which:
            models["dense_llama"] = LlamaForCausalLM(shapes.dense_config()).eval()
    if "llama4x" in which:
        models = {"llama4x": ours, **models}
    return models


@contextmanager
def _building_on(device: torch.device, dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def bench_moe_layer(
    hidden: int, expert_size: int, experts: int, top_k: int, tokens: int, dtype: torch.dtype, device: torch.device,
    repeats: int = 5, profile: bool = False,
) -> dict:  # fmt: skip
    """One MoE block (routed top-k + one shared expert) vs Llama 4's block vs a dense SwiGLU of the active width.
    With `profile`, also `"profile"`: llama4x's and the dense block's forward+backward op tables."""
    config = Llama4XTextConfig(
        hidden_size=hidden, moe_intermediate_size=expert_size, num_local_experts=experts, num_experts_per_tok=top_k,
        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=2, vocab_size=8,
        intermediate_size=(top_k + 1) * expert_size,
    )  # fmt: skip
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with _building_on(device, dtype):
        ours = Llama4XMoE(config)
        for param in ours.parameters():
            torch.nn.init.normal_(param, std=0.02)
        reference = Llama4TextMoe(text_config_to_llama4(config))
        reference.load_state_dict(_moe_state_to_llama4(ours.state_dict()))
        dense = Llama4XMLP(config, config.intermediate_size)
    blocks = {"llama4x": ours, "transformers_llama4": reference, "dense_llama": dense}
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)

    def forward(block):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    def forward_backward(block):
        x.requires_grad_(True)
        forward(block).float().square().mean().backward()
        x.grad = None
        block.zero_grad(set_to_none=True)

    timer = Timer(device, repeats)
    with torch.no_grad():
        fwd = timer.run_interleaved({n: (lambda b=b: forward(b)) for n, b in blocks.items()}, "moe_layer_fwd")
    fwd_bwd = timer.run_interleaved(
        {n: (lambda b=b: forward_backward(b)) for n, b in blocks.items()}, "moe_layer_fwd_bwd"
    )
    routed = moe_layer_flops(hidden, expert_size, experts, top_k, tokens)
    flops = {
        "llama4x": routed,
        "transformers_llama4": routed,
        "dense_llama": moe_layer_flops(
            hidden, expert_size, 0, top_k, tokens
        ),  # as wide as the active experts, no router
    }
    peak = matmul_peak_tflops(device, dtype)
    results = {
        "forward_s": fwd,
        "forward_backward_s": fwd_bwd,
        "matmul_peak_tflops": peak,
        "forward_achieved": achieved(flops, fwd, peak),
        "forward_backward_achieved": achieved({n: 3 * f for n, f in flops.items()}, fwd_bwd, peak),
    }
    if device.type == "cuda":  # how long the host took to queue the kernels: close to the times above = host-bound
        results["forward_host_s"] = timer.host_medians("moe_layer_fwd")
        results["forward_backward_host_s"] = timer.host_medians("moe_layer_fwd_bwd")
    if profile:
        results["profile"] = {
            n: op_table(lambda b=blocks[n]: forward_backward(b), device) for n in ("llama4x", "dense_llama")
        }
    return results


def op_table(fn: Callable[[], object], device: torch.device, rows: int = 30) -> str:
    """torch.profiler's table of the ops of one call of `fn` (after a warm-up call), heaviest first by device
    time on CUDA and CPU time otherwise."""
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def _moe_state_to_llama4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "layers.0.feed_forward."
    converted = dict(text_tensor_to_llama4(prefix + name, tensor) for name, tensor in state.items())
    return {name.removeprefix(prefix): tensor for name, tensor in converted.items()}


def _train_step(model: torch.nn.Module, input_ids: torch.Tensor, forward: Callable | None = None) -> None:
    """Forward (through `forward`, e.g. a compiled model; default the model) + backward of the LM loss on
    `input_ids`, gradients dropped."""
    model.train()
    (model if forward is None else forward)(input_ids=input_ids, labels=input_ids).loss.backward()
    model.zero_grad(set_to_none=True)


def bench_train(
    shapes: Shapes, batch: int, seq: int, dtype: torch.dtype, device: torch.device, repeats: int = 5,
    compiled: bool = False,
) -> dict:  # fmt: skip
    """Whole-model forward + backward on random tokens: seconds per step and tokens/s. `compiled`: llama4x and the
    dense Llama under `torch.compile(fullgraph=True)` (compilation in two warm-up steps: llama4x recompiles once, at its
    second step, when its expert-load totals exist), Llama 4 left out."""
    models = build_models(shapes, dtype, device, which=("llama4x", "dense_llama") if compiled else MODELS)
    input_ids = torch.randint(0, shapes.vocab_size, (batch, seq), device=device)
    forwards = {n: torch.compile(m, fullgraph=True) if compiled else m for n, m in models.items()}

    timer = Timer(device, repeats, warmup=2 if compiled else 1)
    steps = {n: (lambda m=m, f=forwards[n]: _train_step(m, input_ids, f)) for n, m in models.items()}
    seconds = timer.run_interleaved(steps, "train")
    ours, dense = models["llama4x"], models["dense_llama"]
    moe_flops = train_step_flops(ours, ours.config, shapes.num_experts_per_tok, batch, seq)
    flops = {name: moe_flops for name in ("llama4x", "transformers_llama4") if name in models}
    flops["dense_llama"] = train_step_flops(dense, dense.config, 1, batch, seq)
    peak = matmul_peak_tflops(device, dtype)
    return {
        "step_s": seconds,
        "tokens_per_s": {n: batch * seq / s for n, s in seconds.items()},
        "matmul_peak_tflops": peak,
        **achieved(flops, seconds, peak),
    }


def _greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """Greedy `generate` of exactly `new_tokens` tokens per row (EOS suppressed until then) attending to the whole
    prompt: without the explicit mask, `generate` takes every 0 of a random prompt for padding (pad token id 0) and
    the models decode a padded batch (llama4x's chunked layers then fall back to a dense mask)."""
    return model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs,
    )  # fmt: skip


def bench_decode(
    shapes: Shapes, batch: int, prompt: int, new_tokens: int, dtype: torch.dtype, device: torch.device,
    repeats: int = 3, experts_implementation: str = "grouped_mm",
) -> dict:  # fmt: skip
    """Greedy `generate` of `new_tokens` after a `prompt`-token prompt: new tokens per second (whole batch), and
    the weight traffic: GiB of weights read per forward call (from the routing taken, `traffic.py`) and the rate
    at which each model read them, beside the device's streaming bandwidth. `experts_implementation` is
    llama4x's."""
    models = build_models(shapes, dtype, device)
    models["llama4x"].set_experts_implementation(experts_implementation)
    input_ids = torch.randint(0, shapes.vocab_size, (batch, prompt), device=device)
    runs = {n: (lambda m=m: _greedy_generate(m, input_ids, new_tokens)) for n, m in models.items()}
    timer = Timer(device, repeats)
    with torch.no_grad():
        seconds = timer.run_interleaved(runs, "decode")
        traffic = {n: weight_bytes_read(models[n], run) for n, run in runs.items()}  # greedy: the timed routing
    return {
        "generate_s": seconds,
        "tokens_per_s": {n: batch * new_tokens / s for n, s in seconds.items()},
        "weights_read_gib_per_call": {n: read / calls / 2**30 for n, (read, calls) in traffic.items()},
        "weight_read_gb_per_s": {n: traffic[n][0] / s / 1e9 for n, s in seconds.items()},
        "stream_bandwidth_gb_per_s": stream_bandwidth_gbps(device),
    }


def bench_compiled_decode(
    shapes: Shapes, batch: int, prompt: int, new_tokens: int, dtype: torch.dtype, device: torch.device,
    repeats: int = 3,
) -> dict:  # fmt: skip
    """`generate` with a static cache and `torch.compile` (fullgraph) for llama4x and the dense Llama; transformers
    disables compiled decoding for its Llama 4. The first call (compilation) is reported separately."""
    models = build_models(shapes, dtype, device, which=("llama4x", "dense_llama"))
    input_ids = torch.randint(0, shapes.vocab_size, (batch, prompt), device=device)
    kwargs = {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=True)}
    first_call_s = {}
    with torch.no_grad():
        for name, model in models.items():
            start = time.perf_counter()
            _greedy_generate(model, input_ids, new_tokens, **kwargs)
            first_call_s[name] = time.perf_counter() - start
        timer = Timer(device, repeats, warmup=0)
        seconds = timer.run_interleaved(
            {n: (lambda m=m: _greedy_generate(m, input_ids, new_tokens, **kwargs)) for n, m in models.items()},
            "compiled_decode",
        )
    return {
        "first_call_s": first_call_s,
        "generate_s": seconds,
        "tokens_per_s": {n: batch * new_tokens / s for n, s in seconds.items()},
        "compiled": {n: hasattr(m, "_compiled_call") for n, m in models.items()},
    }


def bench_long_context(
    shapes: Shapes, lengths: list[int], dtype: torch.dtype, device: torch.device, repeats: int = 1,
    which=MODELS,
) -> dict:  # fmt: skip
    """Prefill (batch 1, logits of the last position only) per sequence length: seconds and peak memory."""
    models = build_models(shapes, dtype, device, which)
    results = {}
    for length in tqdm(lengths, desc="long context"):
        input_ids = torch.randint(0, shapes.vocab_size, (1, length), device=device)
        fns = {
            n: (lambda m=m, ids=input_ids: m(input_ids=ids, logits_to_keep=1, use_cache=False))
            for n, m in models.items()
        }
        with torch.no_grad():
            # memory first: that run is also each model's warm-up at this length (a prefill is too long to repeat)
            memory = {n: _peak_memory_gib(device, fn) for n, fn in fns.items()}
            seconds = Timer(device, repeats, warmup=0).run_interleaved(fns, f"prefill_{length}")
        results[length] = {"prefill_s": seconds, "peak_gib": memory}
    return results


def bench_kv_cache(shapes: Shapes, lengths: list[int], dtype: torch.dtype, device: torch.device) -> dict:
    """KV-cache size after a prefill of each length (MiB), in all and per layer kind: chunked layers keep at most one
    chunk of keys and values, global (NoPE) layers and the dense model's layers keep every position."""
    models = build_models(shapes, dtype, device)
    results = {}
    for length in tqdm(lengths, desc="kv cache"):
        input_ids = torch.randint(0, shapes.vocab_size, (1, length), device=device)
        results[length] = {}
        for name, model in models.items():
            with torch.no_grad():
                out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            per_kind: dict[str, float] = {}
            for layer in cache.layers:
                mib = (layer.keys.nbytes + layer.values.nbytes) / 2**20
                per_kind[type(layer).__name__] = per_kind.get(type(layer).__name__, 0.0) + mib
            results[length][name] = {"total_mib": sum(per_kind.values()), "per_layer_kind_mib": per_kind}
    return results


def bench_lora_train(
    shapes: Shapes, batch: int, seq: int, dtype: torch.dtype, device: torch.device, repeats: int = 5, rank: int = 8
) -> dict:
    """llama4x training step (fwd+bwd) with PEFT LoRA on the routed experts, on attention, on both, against the frozen
    base (every weight frozen, gradients still flowing back to the embeddings: the floor of any adapter step) and
    full fine-tuning; seconds per step and ratios to the frozen base."""
    from peft import get_peft_model

    from ..lora import lora_config

    variants = {
        "frozen_base": (),
        "lora_routed_experts": ("routed_experts",),
        "lora_attention": ("attention",),
        "lora_attention_and_experts": ("attention", "routed_experts"),
        "full_finetune": None,
    }
    models = {}
    for name, parts in variants.items():
        (model,) = build_models(shapes, dtype, device, which=("llama4x",)).values()
        if parts == ():
            model.requires_grad_(False)
            model.enable_input_require_grads()
        elif parts is not None:
            model = get_peft_model(model, lora_config(model, parts, r=rank))
        models[name] = model
    input_ids = torch.randint(0, shapes.vocab_size, (batch, seq), device=device)

    fns = {n: (lambda m=m: _train_step(m, input_ids)) for n, m in models.items()}
    seconds = Timer(device, repeats).run_interleaved(fns, "lora")
    return {"step_s": seconds, "vs_frozen_base": ratios(seconds, "frozen_base"), "rank": rank}


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    return info


def save_results(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def ratios(values: dict[str, float], baseline: str = "dense_llama") -> dict[str, float]:
    """Each value divided by the baseline's (times: > 1 is slower than the baseline)."""
    return {name: value / values[baseline] for name, value in values.items()}


GPU_SHAPES = Shapes(
    hidden_size=2048, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
    moe_intermediate_size=4096, num_local_experts=16, num_experts_per_tok=1, vocab_size=32000,
    attention_chunk_size=8192, no_rope_layer_interval=4,
)  # fmt: skip


def run_suite(out: str | Path, device: str = "cpu", quick: bool = False, only: list[str] | None = None) -> dict:
    """The performance issue's benchmark set for `device` (`cpu`: the tiny 16-expert config; `cuda`: Scout-shape
    MoE layers and the 12-layer H200 config), written to `out/speed_<device>.json` after every section."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = GPU_SHAPES if cuda else Shapes()
    path = Path(out) / f"speed_{device.type}.json"
    results = {"environment": environment(device), "shapes": asdict(shapes), "dtype": str(dtype)}
    batch, seq = (2, 4096) if cuda else (4, 512)
    prompt, new_tokens = (512 if cuda else 64), (32 if quick else 128)
    lengths = [32768, 65536, 131072] if cuda else [4096, 8192, 16384]
    sections = {
        "moe_layer": lambda: (
            {
                "scout_16x8192_top1": bench_moe_layer(5120, 8192, 16, 1, 8192, dtype, device),
                "fine_grained_64x1024_top2": bench_moe_layer(2048, 1024, 64, 2, 8192, dtype, device),
            }
            if cuda
            else {"tiny_16x1024_top1": bench_moe_layer(512, 1024, 16, 1, 2048, dtype, device)}
        ),
        "train": lambda: bench_train(shapes, batch, seq, dtype, device, repeats=3 if quick else 5),
        "decode_bs1": lambda: bench_decode(shapes, 1, prompt, new_tokens, dtype, device),
        "decode_bs8": lambda: bench_decode(shapes, 8, prompt, new_tokens, dtype, device),
        "long_context": lambda: bench_long_context(shapes, lengths[:1] if quick else lengths, dtype, device),
        "kv_cache": lambda: bench_kv_cache(shapes, lengths[:1] if quick else lengths[:2], dtype, device),
        "lora_train": lambda: bench_lora_train(shapes, batch, seq, dtype, device, repeats=3 if quick else 5),
    }
    if cuda:
        sections["compiled_decode_bs1"] = lambda: bench_compiled_decode(shapes, 1, prompt, new_tokens, dtype, device)
        sections["compiled_decode_bs8"] = lambda: bench_compiled_decode(shapes, 8, prompt, new_tokens, dtype, device)
    if cuda and not quick:
        sections["long_context_1m_llama4x"] = lambda: bench_long_context(
            shapes, [1 << 20], dtype, device, which=("llama4x",)
        )
    unknown = sorted(set(only or ()) - set(sections))
    if unknown:
        raise ValueError(
            f"--only {' '.join(unknown)}: no such section on {device.type}; expected any of {list(sections)}."
        )
    for name, section in sections.items():
        if only and name not in only:
            continue
        results[name] = section()
        save_results(results, path)
        if cuda:
            torch.cuda.empty_cache()
    return results
