"""Fuzzing the `llama4x` command line, the errors it found, and `generate` on saved text and multimodal folders.

Every fuzzed argv ends with a poison: arguments that make the run invalid before any work starts (a value argparse
rejects, a value the library rejects before loading or training anything, a missing folder), so no example can
start a demo, a benchmark, a distillation or a training run. The noise before it varies the parsing: unknown
options, options without their value, junk values (text for numbers, negative, huge and non-finite numbers, empty
strings, missing paths), `--option=value` forms, stray positionals. A watchdog fails an example that runs longer
than `WATCHDOG_S` anyway, and every example runs in a scratch folder, so relative paths land there.
"""

import argparse
import contextlib
import dataclasses
import io
import signal
import time
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from llama4x import Llama4XForCausalLM, Llama4XForConditionalGeneration, Llama4XImageProcessor, Llama4XProcessor
from llama4x.cli import MAX_SEED, main, make_parser
from llama4x.data import python_docs_texts
from llama4x.tokenization import train_tokenizer
from llama4x.training import LoraArguments, ModelArguments
from llama4x.training_data import DataArguments
from tiny import tiny_multimodal_config, tiny_text_config

FUZZ_EXAMPLES = 500
WATCHDOG_S = 10.0
HINT = "(run with --debug for the full traceback)"
MISSING = "/nonexistent/llama4x-fuzz/folder"

JUNK_VALUES = ["", " ", "-", "--", "-1", "0", "-0", "1.5", "1e309", "-1e309", "nan", "inf", "-inf", "abc", "0x10",
               "99999999999999999999", "-99999999999999999999", "4294967296", MISSING, "~/nope", "=", "é中🙂"]  # fmt: skip
# Free text never starts with "-": "--h" or "-h" would be read as --help (argparse accepts abbreviations).
FREE_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12).filter(
    lambda s: not s.startswith("-")
)
JUNK = st.one_of(
    st.sampled_from(JUNK_VALUES), st.integers(-(10**30), 10**30).map(str), st.floats().map(str), FREE_TEXT
)
UNKNOWN_OPTION = st.text("abxyz_-", min_size=1, max_size=8).map(lambda s: "--zz" + s)  # no option starts with --zz

# ---------------------------------------------------------------------------------------------------------------------
# What to fuzz: the options of each subcommand, read from the parser itself (so new options are fuzzed too).


def typed_values(kind, choices=None):
    """Well-typed values (as argv text) for an option of type `kind`, or one of `choices`."""
    if choices is not None:
        return st.sampled_from([str(choice) for choice in choices])
    if kind in (int, "int", "int | None") or getattr(kind, "__name__", "") == "_seed":
        return st.integers(-(10**12), 10**12).map(str)
    if kind in (float, "float", "float | None") or getattr(kind, "__name__", "") == "_finite_float":
        return st.floats(-1e6, 1e6).map(str)
    if kind in (bool, "bool"):
        return st.sampled_from(["true", "false", "yes", "no", "1", "0"])
    return FREE_TEXT


def parser_options(path: tuple[str, ...]) -> dict[str, object]:
    """Option string -> a strategy of well-typed values (None for a flag), for the subparser at `path`.

    `--help` and `--debug` are left out: they change what the command does (help text, tracebacks on purpose)."""
    parser = make_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {
        option: typed_values(action.type, action.choices) if action.nargs != 0 else None
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--debug")
    }


# `train` hands its argv to `llama4x.training`'s HfArgumentParser: our dataclasses' fields plus a few Trainer ones
# (not all of TrainingArguments: some of its fields reach out to DeepSpeed, the Hub or logging integrations).
TRAINER_FIELDS = {"max_steps": int, "learning_rate": float, "seed": int, "per_device_train_batch_size": int}
TRAIN_OPTIONS = {
    f"--{f.name}": typed_values(f.type)
    for dataclass in (ModelArguments, DataArguments, LoraArguments)
    for f in dataclasses.fields(dataclass)
} | {f"--{name}": typed_values(kind) for name, kind in TRAINER_FIELDS.items()}

SUBCOMMANDS = {
    path: parser_options(path) for path in [("demo",), ("generate",), ("bench", "balance"), ("distill",), ("convert",)]
} | {("train",): TRAIN_OPTIONS, ("version",): {}}

# Arguments that end every fuzzed argv and make it invalid before any work starts (see the module docstring).
POISONS = {
    ("demo",): st.sampled_from(
        [
            ["--minutes", "0"],
            ["--minutes", "-2.5"],
            ["--minutes", "nan"],
            ["--minutes", "inf"],
            ["--seed", "-1"],
            ["--seed", "4294967296"],
            ["--fusion", "cross-attention"],
            ["--stop-after", "never"],
        ]
    ),
    ("generate",): st.one_of(
        JUNK.map(lambda prompt: ["--prompt", prompt, "--model", MISSING]),
        JUNK.map(lambda prompt: ["--prompt", prompt, "--model", "."]),  # the scratch folder: empty
        st.sampled_from([["--max-new-tokens", "0"], ["--temperature", "-1"], ["--temperature", "inf"]]),
    ),
    ("bench", "balance"): st.sampled_from(
        [
            ["--steps", "0"],
            ["--steps", "-7"],
            ["--steps", "many"],
            ["--aux-loss-coef", "0"],
            ["--aux-loss-coef", "nan"],
            ["--bias-update-rate", "-0.5"],
            ["--seed", "-1"],
        ]
    ),
    ("train",): st.sampled_from(
        [["--dataset", MISSING + ".txt"], ["--dataset", "no-such-dataset"], ["--max_steps", "many"], ["--zz"]]
    ),
    ("distill",): st.one_of(
        JUNK.map(lambda out: ["--out", out, "--teacher", MISSING]),
        JUNK.map(lambda out: ["--out", out, "--teacher", "."]),
        st.sampled_from([["--steps", "0"], ["--student-kind", "gpt"], ["--layers", "a,b"]]),
    ),
    ("convert",): st.one_of(
        JUNK.map(lambda out: ["--output", out, "--input", MISSING]),
        JUNK.map(lambda out: ["--output", out, "--input", "."]),
        st.sampled_from([["--dtype", "float8"], ["--input"]]),
    ),
    ("version",): st.just([]),  # nothing to poison: `version` only prints
}


def noise(options: dict[str, object]):
    """One piece of noise for a subcommand with `options`: a list of argv elements."""
    kinds = [
        UNKNOWN_OPTION.map(lambda option: [option]),
        st.tuples(UNKNOWN_OPTION, JUNK).map(list),
        JUNK.map(lambda value: [value]),  # a stray positional
    ]
    takes_value = sorted(option for option, values in options.items() if values is not None)
    flags = sorted(option for option, values in options.items() if values is None)
    if takes_value:
        # A known option with a value of its type (a valid one, often): the run gets past argparse to the poison.
        well_typed = st.sampled_from(takes_value).flatmap(lambda option: options[option].map(lambda v: [option, v]))
        kinds += [
            well_typed,
            well_typed,
            st.tuples(st.sampled_from(takes_value), JUNK).map(list),
            st.tuples(st.sampled_from(takes_value), JUNK).map(lambda pair: ["=".join(pair)]),
            st.sampled_from(takes_value).map(lambda option: [option]),  # missing its value
        ]
    if flags:
        kinds += [
            st.sampled_from(flags).map(lambda flag: [flag]),
            st.tuples(st.sampled_from(flags), JUNK).map(lambda pair: ["=".join(pair)]),  # a value for a flag
        ]
    return st.one_of(kinds)


@st.composite
def command_lines(draw) -> tuple[tuple[str, ...], list[str]]:
    """`(subcommand path, argv)`: top-level noise, the subcommand, its noise, then its poison."""
    path = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    top = draw(st.sampled_from([[], [], [], ["--zz"]]))
    pieces = draw(st.lists(noise(SUBCOMMANDS[path]), max_size=4))
    return path, [*top, *path, *(arg for piece in pieces for arg in piece), *draw(POISONS[path])]


# ---------------------------------------------------------------------------------------------------------------------
# Running one command line.


class Overran(BaseException):
    """Raised by the watchdog; a BaseException, so that `main`'s error handler does not turn it into status 1."""


@contextlib.contextmanager
def watchdog(seconds: float, argv: list[str]):
    def fire(signum, frame):
        raise Overran(f"{argv} ran longer than {seconds} s: it may have started real work")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`(exit status, stdout, stderr)` of `llama4x argv`; any other exception escapes (that is a traceback)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), watchdog(WATCHDOG_S, argv):
        try:
            status = main(argv)
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def check_outcome(path: tuple[str, ...], argv: list[str], status: int, out: str, err: str) -> None:
    """Status 2 with argparse's usage message, or 1 with one error line naming the subcommand plus the hint."""
    assert "Traceback" not in out + err, f"{argv}: traceback printed\n{err}"
    if status == 2:
        assert "usage:" in err and "error:" in err, f"{argv}: status 2 without a usage error\n{err}"
    elif status == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 2 and lines[1] == HINT, f"{argv}: expected one error line and the hint, got\n{err}"
        assert lines[0].startswith(f"llama4x {path[0]}: error: "), f"{argv}: {lines[0]!r}"
    else:
        assert status == 0 and argv == ["version"], f"{argv}: unexpected status {status!r}\n{err}"


@pytest.fixture(scope="module")
def warm_imports():
    """Import what the subcommands import, so that no fuzzed example pays for it."""
    import llama4x.benchmarks.balance  # noqa: F401
    import llama4x.conversion  # noqa: F401
    import llama4x.demo  # noqa: F401
    import llama4x.distillation  # noqa: F401
    import llama4x.training  # noqa: F401


def test_fuzzed_command_lines_exit_1_or_2_without_traceback(warm_imports, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outcomes: Counter = Counter()
    slowest = [0.0, None]

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    @given(case=command_lines())
    def run(case):
        path, argv = case
        start = time.perf_counter()
        status, out, err = run_cli(argv)
        elapsed = time.perf_counter() - start
        slowest[:] = max(slowest, [elapsed, argv], key=lambda pair: pair[0])
        outcomes[(" ".join(path), status)] += 1
        check_outcome(path, argv, status, out, err)

    run()
    total = sum(outcomes.values())
    print(f"\n{total} fuzzed command lines, slowest {slowest[0]:.2f} s ({slowest[1]}); by (subcommand, status):")
    for key, count in sorted(outcomes.items()):
        print(f"  {key}: {count}")
    assert total >= FUZZ_EXAMPLES
    assert not any(tmp_path.iterdir()), "a fuzzed command wrote into the scratch folder"
    assert {path for path, _ in outcomes} == {" ".join(path) for path in SUBCOMMANDS}


# ---------------------------------------------------------------------------------------------------------------------
# The errors the fuzzing found, each pinned down.


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--minutes", "inf"], "argument --minutes: 'inf' is not a finite number"),  # ran without end
        (["demo", "--seed", "-1"], "argument --seed: '-1' is not a seed: expected an int in 0..4294967295"),
        (["generate", "--model", MISSING, "--prompt", "x", "--temperature", "nan"], "--temperature: 'nan' is not"),
        (["generate", "--model", MISSING, "--prompt", "x", "--seed", str(MAX_SEED + 1)], "--seed: '4294967296'"),
        (["bench", "balance", "--aux-loss-coef", "inf"], "argument --aux-loss-coef: 'inf' is not a finite number"),
        (["bench", "balance", "--bias-update-rate", "nan"], "--bias-update-rate: 'nan' is not a finite number"),
        (["bench", "balance", "--seed", "-5"], "argument --seed: '-5' is not a seed"),
    ],
)
def test_non_finite_numbers_and_bad_seeds_are_usage_errors(argv, message):
    status, _, err = run_cli(argv)
    assert status == 2 and message in err, err


def fake_folder(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("{}")
    return str(folder)


@pytest.mark.parametrize(
    "command, files, message",
    [
        (["generate", "--prompt", "x", "--model"], (), "--model '{}' has no config.json"),  # was: sentencepiece
        (["generate", "--prompt", "x", "--model"], ("config.json",), "--model '{}' has no tokenizer"),
        (["distill", "--out", "o", "--teacher"], None, "--teacher '{}' is not a directory"),  # was: Hub repo id
        (["distill", "--out", "o", "--teacher"], (), "--teacher '{}' has no config.json"),
        (["distill", "--out", "o", "--seed", "-1", "--teacher"], ("config.json", "tokenizer.json"), "--seed -1"),
    ],
)
def test_model_folder_problems_are_named_on_one_line(tmp_path, command, files, message):
    folder = str(tmp_path / "missing") if files is None else fake_folder(tmp_path / "model", *files)
    status, _, err = run_cli([*command, folder])
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 2 and message.format(folder) in lines[0], err


def test_multi_line_exception_messages_print_on_one_line(monkeypatch):
    def fail(args):
        raise OSError("first line\n\n   second line\n")

    monkeypatch.setattr("llama4x.cli._cmd_version", fail)
    status, _, err = run_cli(["version"])
    assert status == 1
    assert err.splitlines() == ["llama4x version: error: OSError: first line second line", HINT]


# ---------------------------------------------------------------------------------------------------------------------
# `generate` on saved folders: a text model, and a multimodal one (AutoModelForCausalLM has no mapping for its
# config; the command used to fail on it).


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(python_docs_texts()[:3], vocab_size=300)


def save_model(kind: str, tokenizer, folder) -> type:
    """Save a tiny random `kind` ("text" or "multimodal") model with `tokenizer`'s ids; return its loader class."""
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    torch.manual_seed(0)
    if kind == "text":
        Llama4XForCausalLM(tiny_text_config(**ids)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return AutoModelForCausalLM
    config = tiny_multimodal_config("encoder", **ids)
    token = tokenizer.convert_tokens_to_ids
    config.image_token_id, config.boi_token_id, config.eoi_token_id = (
        token("<|patch|>"), token("<|image_start|>"), token("<|image_end|>")
    )  # fmt: skip
    Llama4XForConditionalGeneration(config).save_pretrained(folder)
    vision = config.vision_config
    image_processor = Llama4XImageProcessor(size=vision.image_size, max_patches=4)
    processor = Llama4XProcessor(
        image_processor, tokenizer, patch_size=vision.patch_size, pixel_shuffle_ratio=vision.pixel_shuffle_ratio
    )
    processor.save_pretrained(folder)
    return AutoModelForImageTextToText


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_generate_prints_the_greedy_continuation_of_a_saved_model(tokenizer, tmp_path, kind):
    loader = save_model(kind, tokenizer, tmp_path)
    prompt = "def main("
    status, out, err = run_cli(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6"])
    assert status == 0, err

    model = loader.from_pretrained(tmp_path).eval()
    suppress = {"suppress_tokens": [model.config.image_token_id]} if kind == "multimodal" else {}
    inputs = AutoTokenizer.from_pretrained(tmp_path)(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, **suppress)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 6
    assert out == tokenizer.decode(ids[0], skip_special_tokens=True) + "\n"
    assert out.startswith(prompt)
