"""The `llama4x` command.

    llama4x demo [--out DIR] [--quick] [--minutes N] [--seed S]   # the main job, on bundled data
    llama4x generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T]   # text or multimodal DIR
    llama4x bench balance [--steps N] [--out DIR] [--seed S] [--quick]   # balancing benchmark, see BENCHMARKS.md
    llama4x bench moe-layer|train|decode|decode-overhead|long-context|kv-cache|lora [--device D] [sizes]  # vs Llama 4, dense
    llama4x bench speed [--device D] [--only SECTION ...]      # the whole speed suite (BENCHMARKS.md)
    llama4x train [--model DIR | --preset NAME] [--dataset D] [--lora ...] [TrainingArguments ...]   # Trainer
    llama4x distill --teacher DIR --out DIR [--student-kind llama4x|llama] [--layers N] [--loss L] [--offline] ...
    llama4x version                                            # or: llama4x --version

Add `--debug` (before or after the subcommand) to get full tracebacks instead of a one-line error message.
Subcommands are thin wrappers: the work lives in library functions (`llama4x.demo.run_demo`, ...).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# numpy's `seed` (reached through transformers' `set_seed`) accepts 0..2**32 - 1 only.
MAX_SEED = 2**32 - 1
# A folder written by `save_pretrained` plus the tokenizer's (or processor's) `save_pretrained`.


def _finite_float(text: str) -> float:
    """argparse type: a finite float (`float` also parses `nan` and `inf`, which no option accepts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _seed(text: str) -> int:
    """argparse type: a random seed, an int in 0..MAX_SEED (what numpy accepts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed: expected an int in 0..{MAX_SEED}")
    return value


def _one_line(exc: BaseException) -> str:
    """`exc`'s message on one line (some library errors span several lines), or "(no message)"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) if lines else "(no message)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama4x")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings.create(quick=args.quick, seed=args.seed, minutes=args.minutes, fusion=args.fusion)
    run_demo(args.out, settings, stop_after=args.stop_after)
    return 0


def _load_generation_model(model_dir: Path) -> tuple[PreTrainedModel, list[int]]:
    """The model saved in `model_dir` and the token ids it must not generate from a text prompt.

    A multimodal llama4x folder (`Llama4XConfig`) loads as `Llama4XForConditionalGeneration` through
    AutoModelForImageTextToText (AutoModelForCausalLM maps only the text config); its image placeholder is
    suppressed, since no image backs a generated one. Any other folder loads with AutoModelForCausalLM. A PEFT
    adapter folder (`llama4x train --lora`) loads on top of the base model its `adapter_config.json` names.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from .configuration_llama4x import Llama4XConfig

    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base_dir = Path(PeftConfig.from_pretrained(model_dir).base_model_name_or_path)
        if not (base_dir / "config.json").is_file():
            raise ValueError(
                f"--model {str(model_dir)!r} is an adapter whose base model {str(base_dir)!r} has no config.json"
            )
        base, suppressed = _load_generation_model(base_dir)
        return PeftModel.from_pretrained(base, model_dir), suppressed
    config = AutoConfig.from_pretrained(model_dir)
    if isinstance(config, Llama4XConfig):
        return AutoModelForImageTextToText.from_pretrained(model_dir), [config.image_token_id]
    return AutoModelForCausalLM.from_pretrained(model_dir), []


def _cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoints import check_model_folder

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    model_dir = Path(args.model)
    check_model_folder("--model", model_dir)

    import torch
    from transformers import AutoTokenizer, set_seed

    import llama4x  # noqa: F401  (registers the llama4x model types with the Auto classes)

    set_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, suppressed = _load_generation_model(model_dir)
    model = model.to(device).eval()
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    if suppressed:
        sampling["suppress_tokens"] = suppressed
    if args.image:
        return _answer_about_images(model, model_dir, args, sampling, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    return 0


def _answer_about_images(model, model_dir: Path, args: argparse.Namespace, sampling: dict, device: str) -> int:
    """`llama4x generate --image ...`: one chat turn (the images, then `--prompt`); prints the model's answer, up to
    the end of its turn."""
    import torch
    from transformers import AutoProcessor

    from .configuration_llama4x import Llama4XConfig
    from .data import image_question_prompt
    from .image_sources import open_image
    from .processing_llama4x import Llama4XProcessor
    from .tokenization import EOT_TOKEN

    if not isinstance(model.config, Llama4XConfig):  # a PeftModel's config is its base model's
        raise ValueError(f"--image needs a multimodal llama4x model; --model {str(model_dir)!r} is text-only")
    processor = AutoProcessor.from_pretrained(model_dir)
    if not isinstance(processor, Llama4XProcessor):
        raise ValueError(f"--model {str(model_dir)!r} has no Llama4XProcessor (processor_config.json) for --image")
    images = [open_image(path, processor.image_processor.max_image_pixels) for path in args.image]
    prompt = image_question_prompt(processor, args.prompt, num_images=len(images))
    # the template starts with <|begin_of_text|>
    inputs = processor(text=prompt, images=images, add_special_tokens=False, return_tensors="pt").to(device)
    eot = processor.tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, eos_token_id=eot, **sampling)
    print(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return 0


def _cmd_bench_balance(args: argparse.Namespace) -> int:
    from .benchmarks.balance import run_balance_benchmark

    run_balance_benchmark(
        args.out,
        steps=args.steps,
        seed=args.seed,
        quick=args.quick,
        aux_loss_coef=args.aux_loss_coef,
        bias_update_rate=args.bias_update_rate,
    )
    return 0


def add_bench_balance_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `llama4x bench balance` (also used by scripts/bench_balance.py)."""
    from .benchmarks.balance import DEFAULT_STEPS, QUICK_STEPS

    parser.add_argument("--out", default="benchmarks/balance", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per variant (default: {DEFAULT_STEPS}, or {QUICK_STEPS} with --quick)",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke-sized run: {QUICK_STEPS} steps and a small held-out set"
    )
    parser.add_argument(
        "--aux-loss-coef",
        type=_finite_float,
        default=0.01,
        help="router_aux_loss_coef of variants (b), (d) (default: %(default)s)",
    )
    parser.add_argument(
        "--bias-update-rate",
        type=_finite_float,
        default=0.001,
        help="router_bias_update_rate of variants (c), (d) (default: %(default)s)",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import main as train_main

    train_main(args.train_args)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .checkpoints import check_model_folder
    from .distillation import run_distill_command

    # Checked here, before any work: the library would report a missing folder as an invalid Hub repo id.
    check_model_folder("--teacher", args.teacher, adapter_ok=False)
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed {args.seed} is not a seed: expected an int in 0..{MAX_SEED}")

    run_distill_command(args)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .conversion import convert_checkpoint

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    out = convert_checkpoint(args.input, args.output, dtype=dtype, overwrite=args.overwrite)
    print(f"converted {args.input} -> {out}")
    return 0


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `llama4x convert` (also used by scripts/convert_llama4_checkpoint.py)."""
    parser.add_argument("--input", required=True, help="a saved Llama 4 or llama4x checkpoint folder (safetensors)")
    parser.add_argument("--output", required=True, help="the folder to write; must be new or empty")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="cast floating-point weights (default: keep)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")


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
        help="train, evaluate, LoRA-tune and distill a tiny multimodal MoE on bundled data, with a report",
        description="The main job, offline on a CPU: tokenizer, early-fusion MoE teacher pretrained on Python's docs "
        "and handwritten digits, evaluation, LoRA on a new question, distillation into dense students; writes the "
        "models, report.md, report.json and plots to --out. Rerunning into the same --out resumes a run.",
    )
    demo.add_argument("--out", default="./llama4x-demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--quick", action="store_true", help="a smoke-sized run (about 1 minute on 2 cores, lower targets)"
    )
    demo.add_argument(
        "--minutes",
        type=_finite_float,
        default=None,
        help="fit the training steps to about N minutes on this machine (measured); default: fixed steps, about 7 "
        "minutes on 2 CPU cores",
    )
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (default: %(default)s)")
    demo.add_argument(
        "--fusion", default="patch", choices=("patch", "encoder"), help="vision front-end (default: %(default)s)"
    )
    demo.add_argument(
        "--stop-after",
        default=None,
        choices=("tokenizer", "teacher", "evaluate", "lora", "distill"),
        help="last stage before the report (default: all)",
    )
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser("generate", parents=[debug], help="generate text from a saved model folder")
    gen.add_argument(
        "--model",
        required=True,
        help="folder written by save_pretrained, with its tokenizer: a text or a multimodal llama4x model (e.g. from "
        "`llama4x demo`)",
    )
    gen.add_argument("--prompt", required=True, help="text to continue; with --image, the question about the images")
    gen.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image file for a multimodal model (repeatable): the prompt becomes a chat turn with the images "
        "before the question, and the answer is printed",
    )
    gen.add_argument("--max-new-tokens", type=int, default=50, help="default: %(default)s")
    gen.add_argument("--temperature", type=_finite_float, default=0.0, help="0 = greedy (default), > 0 samples")
    gen.add_argument("--seed", type=_seed, default=0, help="random seed for sampling (default: %(default)s)")
    gen.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", parents=[debug], help="run a benchmark (see BENCHMARKS.md)")
    bench_sub = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    balance = bench_sub.add_parser(
        "balance",
        parents=[debug],
        help="train the tiny preset with four load-balancing variants under one budget and compare them",
        description="No balancing / aux loss / loss-free bias / both on the tiny preset, same data, init and steps; "
        "writes results.json, results.md and PNG plots to --out.",
    )
    add_bench_balance_arguments(balance)
    balance.set_defaults(func=_cmd_bench_balance)
    from .benchmarks.speed_cli import add_speed_commands

    add_speed_commands(bench_sub, parents=[debug])

    # Its options (ours plus every TrainingArguments field) belong to `llama4x.training`'s HfArgumentParser, which
    # receives everything after `train`; `llama4x train --help` lists them. Use `llama4x --debug train ...`.
    train = sub.add_parser("train", add_help=False, help="train or fine-tune with transformers.Trainer (--help)")
    train.set_defaults(func=_cmd_train)

    from .distillation import add_distill_arguments

    distill = sub.add_parser(
        "distill",
        parents=[debug],
        help="distill a llama4x MoE teacher into a dense student (llama4x or Llama kind)",
        description="Student from the teacher's config and weights, trained with DistillationTrainer on bundled data "
        "next to a labels-only student; writes both, and distillation_report.{md,json,png}, to --out.",
    )
    add_distill_arguments(distill)
    distill.set_defaults(func=_cmd_distill)

    convert = sub.add_parser(
        "convert",
        parents=[debug],
        help="convert a transformers Llama 4 checkpoint folder to llama4x, or a llama4x one to Llama 4",
        description="The direction follows the input's model_type. Reads one shard at a time and writes the output "
        "only when complete; the input is never modified.",
    )
    add_convert_arguments(convert)
    convert.set_defaults(func=_cmd_convert)

    ver = sub.add_parser("version", parents=[debug], help="print the installed llama4x version")
    ver.set_defaults(func=_cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `llama4x` command with `argv` (default: `sys.argv[1:]`); return the exit status.

    Usage errors exit with status 2 (argparse). An exception inside a subcommand prints `llama4x COMMAND: error:
    ...` on one line of stderr and returns 1, or re-raises with `--debug`.
    """
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.train_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("llama4x: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"llama4x {args.command}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        print("(run with --debug for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
