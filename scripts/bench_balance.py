"""Load-balancing benchmark: the tiny preset trained with no balancing / aux loss / loss-free bias / both.

    python scripts/bench_balance.py                              # full run (~7-10 min on 2 idle CPU cores)
    OMP_NUM_THREADS=1 python scripts/bench_balance.py            # on a shared machine (avoids oversubscription)
    python scripts/bench_balance.py --quick --out /tmp/balance   # smoke-sized run, seconds
    python scripts/bench_balance.py --steps 2000 --bias-update-rate 0.01

The same as `llama4x bench balance`; the work is `llama4x.benchmarks.balance.run_balance_benchmark`, and results go to
`--out` (default benchmarks/balance): results.json, results.md, max_violation.png, lm_loss.png,
expert_load_heatmap.png. See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llama4x.benchmarks.balance import run_balance_benchmark
from llama4x.cli import add_bench_balance_arguments


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_balance_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    run_balance_benchmark(
        args.out,
        steps=args.steps,
        seed=args.seed,
        quick=args.quick,
        aux_loss_coef=args.aux_loss_coef,
        bias_update_rate=args.bias_update_rate,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
