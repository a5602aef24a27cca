"""Load-balancing benchmark: the tiny preset trained with no balancing / aux loss / loss-free bias / both.

    python scripts/bench_balance.py                              # full run (~7-10 min on 2 idle CPU cores)
    OMP_NUM_THREADS=1 python scripts/bench_balance.py            # on a shared machine (avoids oversubscription)
    python scripts/bench_balance.py --quick --out /tmp/balance   # smoke-sized run, seconds
    python scripts/bench_balance.py --steps 2000 --bias-update-rate 0.01

A thin wrapper of `llama4x bench balance`; the work is `llama4x.benchmarks.balance.run_balance_benchmark`, and results go to
`--out` (default benchmarks/balance): results.json, results.md, max_violation.png, lm_loss.png,
expert_load_heatmap.png. See BENCHMARKS.md.
"""

import sys

from llama4x.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "balance", *sys.argv[1:]]))
