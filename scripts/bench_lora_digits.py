"""LoRA fine-tuning on digits (see BENCHMARKS.md, "LoRA fine-tuning on digits"; `llama4x.benchmarks.lora_digits`).

python scripts/bench_lora_digits.py --out benchmarks/lora_digits
python scripts/bench_lora_digits.py --out /tmp/lora_digits --pretrain-steps 20 --lora-steps 10   # smoke run
"""

import argparse
import json

from llama4x.benchmarks.lora_digits import run_lora_digits_benchmark


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/lora_digits", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=600, help="digit pretraining steps (default: %(default)s)"
    )
    parser.add_argument("--lora-steps", type=int, default=300, help="LoRA steps on parity (default: %(default)s)")
    parser.add_argument("--lora-parts", default="attention,routed_experts,router", help="default: %(default)s")
    parser.add_argument("--lora-r", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument(
        "--reuse-pretrained", action="store_true", help="skip pretraining if --out already holds a pretrained model"
    )
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    results = run_lora_digits_benchmark(
        args.out, args.pretrain_steps, args.lora_steps, args.seed, args.lora_parts, args.lora_r, args.reuse_pretrained
    )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
