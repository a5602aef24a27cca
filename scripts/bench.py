"""Speed benchmarks of llama4x vs transformers' Llama 4 vs a dense Llama: `llama4x bench speed` (see BENCHMARKS.md).

PYTHONPATH=src python scripts/bench.py --device cpu --out benchmarks/results
PYTHONPATH=src python scripts/bench.py --device cuda --out benchmarks/results [--only train decode_bs1]
"""

import sys

from llama4x.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "speed", *sys.argv[1:]]))
