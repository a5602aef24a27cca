"""Distill a llama4x MoE teacher into a dense student (the same as `llama4x distill`; see `llama4x.distillation`).

    llama4x train --preset tiny --dataset pydocs --output-dir teacher --max-steps 400 --block-size 128  # a teacher
    python scripts/distill.py --teacher teacher --out student                   # llama4x student, forward KL, online
    python scripts/distill.py --teacher teacher --out student-llama --student-kind llama --layers 2
    python scripts/distill.py --teacher teacher --out student-topk --loss topk_kl --top-k 32 --offline
    python scripts/distill.py --teacher mm-teacher --out mm-student           # multimodal teacher: digits VQA
    python scripts/distill.py --help                                            # every option

`--out` receives the student and its tokenizer (or processor), `labels_only/` (the same student trained on the labels
only, same steps), and `distillation_report.md/.json/.png`: held-out perplexity (and digits accuracy), parameters,
active parameters, parameter memory and decode tokens/s of teacher, distilled and labels-only students.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llama4x.distillation import add_distill_arguments, run_distill_command


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_distill_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    run_distill_command(make_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
