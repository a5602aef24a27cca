"""Benchmarks of llama4x: each module is a library function that runs one benchmark and writes its results and
plots to a folder; `llama4x bench ...` and `scripts/bench_*.py` are thin wrappers around them (see BENCHMARKS.md).

The modules are imported on demand (`from llama4x.benchmarks.balance import run_balance_benchmark`), so one
benchmark's dependencies never load with another's.
"""
