"""The `llama4x` command.

    llama4x demo [--out DIR] [--steps N] [--seed S] [--quick]   # the main job, on bundled data
    llama4x generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    llama4x version                                            # or: llama4x --version

Add `--debug` (before or after the subcommand) to get full tracebacks instead of a one-line error message.
Subcommands are thin wrappers: the work lives in library functions (`llama4x.smoke.run_smoke`, ...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

QUICK_STEPS = 12


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama4x")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _cmd_demo(args: argparse.Namespace) -> int:
    from .smoke import run_smoke

    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else 40)
    run_smoke(args.out, steps=steps, seed=args.seed, eval_blocks=4 if args.quick else 16)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ValueError(f"--model {str(model_dir)!r} is not a directory (expected a save_pretrained folder)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    import llama4x  # noqa: F401  (registers the llama4x model types with the Auto classes)

    set_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"llama4x {_version()}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    """Build the argument parser for `llama4x` (one subparser per subcommand)."""
    # --debug is accepted before and after the subcommand; SUPPRESS keeps the subparser from resetting a value
    # given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")

    parser = argparse.ArgumentParser(prog="llama4x", description="Llama-4-style MoE models for transformers.")
    parser.add_argument("--version", action="version", version=f"llama4x {_version()}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        parents=[debug],
        help="train a tokenizer and the tiny model on bundled data, evaluate, sample, save",
        description="The main job: tokenizer + tiny llama4x trained on Python's docs; writes model, "
        "tokenizer, results.json and loss_curve.png to --out.",
    )
    demo.add_argument("--out", default="./llama4x-demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--steps", type=int, default=None, help=f"training steps (default: 40, or {QUICK_STEPS} with --quick)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help=f"a fast run: {QUICK_STEPS} steps and a smaller eval set")
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser("generate", parents=[debug], help="generate text from a saved model folder")
    gen.add_argument("--model", required=True, help="folder written by save_pretrained (e.g. by `llama4x demo`)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="default: %(default)s")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    gen.set_defaults(func=_cmd_generate)

    ver = sub.add_parser("version", parents=[debug], help="print the installed llama4x version")
    ver.set_defaults(func=_cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `llama4x` command with `argv` (default: `sys.argv[1:]`); return the exit status.

    Usage errors exit with status 2 (argparse). An exception inside a subcommand prints `llama4x: error: ...` on
    stderr and returns 1, or re-raises with `--debug`.
    """
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("llama4x: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"llama4x {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("(run with --debug for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
