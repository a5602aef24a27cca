"""Speed benchmarks of llama4x vs transformers' Llama 4 vs a dense Llama (see BENCHMARKS.md).

PYTHONPATH=src python scripts/bench.py --device cpu --out benchmarks/results
PYTHONPATH=src python scripts/bench.py --device cuda --out benchmarks/results
"""

import argparse
import json
import sys

from llama4x.benchmarks.speed import run_suite


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="benchmarks/results", help="folder for speed_<device>.json")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and lengths")
    parser.add_argument("--only", nargs="*", help="run only these sections (e.g. train decode_bs1)")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    results = run_suite(args.out, device=args.device, quick=args.quick, only=args.only)
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
