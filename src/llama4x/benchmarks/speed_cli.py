"""`llama4x bench moe-layer | grouped-gemm | train | decode | decode-overhead | long-context | kv-cache | lora | speed`:
the speed benchmarks of `llama4x.benchmarks.speed`, `.grouped_gemm` and `.overhead` from the command line. Each prints its medians beside the
ratios to its baseline and writes `--out/bench_<name>_<device>.json`."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import grouped_gemm, overhead, speed


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _add_shape_options(parser: argparse.ArgumentParser, defaults: speed.Shapes) -> None:
    """One `--field` per `speed.Shapes` field."""
    for item in fields(speed.Shapes):
        parser.add_argument(
            f"--{item.name.replace('_', '-')}", type=_positive_int, default=getattr(defaults, item.name)
        )


def _shapes(args: argparse.Namespace) -> speed.Shapes:
    return speed.Shapes(**{item.name: getattr(args, item.name) for item in fields(speed.Shapes)})


def _device(name: str):
    """`--device`: cpu, or cuda (cuda:N) when a CUDA device is available."""
    from ..validation import check_device

    return check_device("--device", name)


def _device_and_dtype(args: argparse.Namespace):
    import torch

    device = _device(args.device)
    # decode-overhead counts the GPU path: bfloat16 everywhere (float32 on CPU takes `experts_cpu`'s loop).
    bf16_default = device.type == "cuda" or args.speed_command == "decode-overhead"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if bf16_default else "float32")
    ]
    return device, dtype


def _moe_layer(args, device, dtype) -> dict:
    results = speed.bench_moe_layer(
        args.hidden, args.expert_size, args.experts, args.top_k, args.tokens, dtype, device, args.repeats,
        profile=args.profile,
    )  # fmt: skip
    tables = results.pop("profile", None)
    if tables:
        path = Path(args.out) / f"profile_moe-layer_{device.type}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"== {name}, forward+backward\n{table}\n" for name, table in tables.items()))
        print(f"wrote {path}")
    return results


def _grouped_gemm(args, device, dtype) -> dict:
    return grouped_gemm.bench_grouped_gemm(
        args.hidden, args.expert_size, args.experts, args.top_k, args.tokens, dtype, device, args.repeats
    )


def _train(args, device, dtype) -> dict:
    return speed.bench_train(_shapes(args), args.batch, args.seq, dtype, device, args.repeats, args.compile)


def _decode(args, device, dtype) -> dict:
    shapes = _shapes(args)
    return {
        f"batch_{b}": speed.bench_decode(
            shapes, b, args.prompt, args.new_tokens, dtype, device, args.repeats, args.experts_implementation
        )
        for b in args.batch
    }


def _decode_overhead(args, device, dtype) -> dict:
    return overhead.bench_decode_overhead(_shapes(args), args.batch, args.prompt, dtype, device, args.steps)


def _long_context(args, device, dtype) -> dict:
    return speed.bench_long_context(_shapes(args), args.lengths, dtype, device, args.repeats)


def _kv_cache(args, device, dtype) -> dict:
    return speed.bench_kv_cache(_shapes(args), args.lengths, dtype, device)


def _lora(args, device, dtype) -> dict:
    return speed.bench_lora_train(_shapes(args), args.batch, args.seq, dtype, device, args.repeats, args.rank)


COMMANDS = {
    "moe-layer": (_moe_layer, "one MoE block fwd and fwd+bwd vs transformers' Llama4TextMoe vs a dense SwiGLU"),
    "grouped-gemm": (
        _grouped_gemm,
        "the routed experts' grouped GEMMs (two weight layouts) vs a dense GEMM of the same FLOPs, per projection",
    ),
    "train": (_train, "whole-model training step vs transformers' Llama 4 vs the dense-equal-active Llama"),
    "decode": (_decode, "greedy generate tokens/s at the given batch sizes"),
    "decode-overhead": (
        _decode_overhead,
        "operators per eager decode step and its time at tiny sizes (the host cost of eager GPU decoding)",
    ),
    "long-context": (_long_context, "prefill time and peak memory over sequence lengths"),
    "kv-cache": (_kv_cache, "KV-cache size after a prefill, per layer kind"),
    "lora": (_lora, "training step with PEFT LoRA on routed experts / attention vs the frozen base"),
}


def add_speed_commands(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    """Add the speed benchmarks to `llama4x bench`'s subparsers."""
    for name, (_, help_text) in COMMANDS.items():
        parser = subparsers.add_parser(name, parents=parents, help=help_text, description=help_text)
        parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
        parser.add_argument(
            "--dtype",
            choices=("float32", "bfloat16"),
            help="default: float32 on CPU, bf16 on CUDA and for decode-overhead",
        )
        if name != "decode-overhead":  # which times --steps decode steps instead
            parser.add_argument(
                "--repeats", type=_positive_int, default=5, help="timed repeats; the median is reported"
            )
        parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON (default: %(default)s)")
        if name in ("moe-layer", "grouped-gemm"):
            parser.add_argument("--hidden", type=_positive_int, default=512)
            parser.add_argument("--expert-size", type=_positive_int, default=1024)
            parser.add_argument("--experts", type=_positive_int, default=16)
            parser.add_argument("--top-k", type=_positive_int, default=1)
            parser.add_argument("--tokens", type=_positive_int, default=2048)
            if name == "moe-layer":
                parser.add_argument("--profile", action="store_true", help="also write torch.profiler op tables")
        elif name == "decode-overhead":
            _add_shape_options(parser, overhead.overhead_shapes())
            parser.add_argument("--batch", type=_positive_int, default=1)
            parser.add_argument("--prompt", type=_positive_int, default=64)
            parser.add_argument("--steps", type=_positive_int, default=50, help="timed decode steps (median)")
        else:
            _add_shape_options(parser, speed.Shapes())
        if name in ("train", "lora"):
            parser.add_argument("--batch", type=_positive_int, default=4)
            parser.add_argument("--seq", type=_positive_int, default=512)
        if name == "train":
            parser.add_argument(
                "--compile", action="store_true", help="llama4x and the dense Llama under torch.compile (fullgraph)"
            )
        if name == "lora":
            parser.add_argument("--rank", type=_positive_int, default=8)
        if name == "decode":
            parser.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 8])
            parser.add_argument("--prompt", type=_positive_int, default=64)
            parser.add_argument("--new-tokens", type=_positive_int, default=128)
            parser.add_argument(
                "--experts-implementation", choices=("grouped_mm", "batched_mm", "eager"), default="grouped_mm",
                help="llama4x's routed-experts kernel (default: %(default)s)",
            )  # fmt: skip
        if name in ("long-context", "kv-cache"):
            parser.add_argument("--lengths", type=_positive_int, nargs="+", default=[4096, 8192, 16384])
        parser.set_defaults(func=run_speed_command, speed_command=name)

    suite = subparsers.add_parser(
        "speed", parents=parents, help="the whole performance suite (every benchmark above, issue configs)"
    )
    suite.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    suite.add_argument("--out", default="benchmarks/results", help="folder for speed_<device>.json")
    suite.add_argument("--quick", action="store_true", help="fewer repeats and lengths")
    suite.add_argument("--only", nargs="+", help="run only these sections (e.g. train decode_bs1)")
    suite.set_defaults(func=run_speed_suite)


def run_speed_command(args: argparse.Namespace) -> int:
    device, dtype = _device_and_dtype(args)
    run, _ = COMMANDS[args.speed_command]
    results = {"environment": speed.environment(device), "dtype": str(dtype), "arguments": _arguments(args)}
    results["results"] = run(args, device, dtype)
    path = speed.save_results(results, Path(args.out) / f"bench_{args.speed_command}_{device.type}.json")
    print_table(results["results"])
    print(f"wrote {path}")
    return 0


def run_speed_suite(args: argparse.Namespace) -> int:
    results = speed.run_suite(args.out, device=_device(args.device), quick=args.quick, only=args.only)
    print_table({key: value for key, value in results.items() if key not in ("environment", "shapes", "dtype")})
    return 0


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {key: value for key, value in vars(args).items() if key not in ("func", "debug")}


def print_table(results: dict, prefix: str = "") -> None:
    """One line per measured quantity: each model's value, then its ratio to the baseline (dense Llama, dense GEMM,
    frozen base) when the row has one."""
    for key, value in results.items():
        label = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            baseline = next((b for b in ("dense_llama", "dense_mm", "frozen_base") if value.get(b)), None)
            cells = []
            for name, number in value.items():
                ratio = f" ({number / value[baseline]:.2f}x)" if baseline else ""
                cells.append(f"{name} {number:.4g}{ratio}")
            print(f"{label}: " + ", ".join(cells))
        elif isinstance(value, dict):
            print_table(value, prefix=f"{label}/")
        else:
            print(f"{label}: {json.dumps(value, default=str)}")
