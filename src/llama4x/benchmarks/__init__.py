"""Benchmarks of llama4x features, each a library function that writes results and plots to a folder.

- `balance.run_balance_benchmark`: expert-load balancing strategies (none / aux loss / loss-free bias / both) on the
  tiny preset (`llama4x bench balance`).
"""

from .balance import VARIANTS, run_balance_benchmark

__all__ = ["VARIANTS", "run_balance_benchmark"]
