"""Tests for the `llama4x` command: the demo end to end (in a subprocess), generate, version and error handling."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import llama4x
from llama4x.cli import main
from llama4x.data import python_docs_texts, train_eval_split
from llama4x.smoke import evaluate_lm_loss, make_lm_blocks


def _llama4x_command() -> list[str]:
    script = Path(sys.executable).parent / "llama4x"
    assert script.exists(), f"console script {script} is missing: install the package (bash scripts/setup.sh)"
    return [str(script)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run `llama4x demo --quick` once in a subprocess; yield (output folder, results.json, stdout)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [*_llama4x_command(), "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"demo failed with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_demo_quick_trains_reports_and_writes_its_outputs(demo_run):
    out, results, stdout = demo_run
    for name in ["config.json", "model.safetensors", "tokenizer.json", "results.json", "loss_curve.png"]:
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert len(results["train_losses"]) == results["settings"]["steps"]
    assert results["final_loss"] < results["initial_loss"], (results["initial_loss"], results["final_loss"])
    assert results["eval_loss_after"] < results["eval_loss_before"], (
        results["eval_loss_before"],
        results["eval_loss_after"],
    )
    assert results["sample"].startswith("def ")
    assert "eval loss" in stdout and "sample:" in stdout
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_output_reloads_with_auto_classes_and_reproduces_the_eval_loss(demo_run):
    out, results, _ = demo_run
    settings = results["settings"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, llama4x.Llama4XForCausalLM)
    assert len(tokenizer) == model.config.vocab_size == settings["vocab_size"]

    _, eval_texts = train_eval_split(python_docs_texts(), settings["eval_fraction"], seed=settings["seed"])
    blocks = [t[: settings["eval_blocks"]] for t in make_lm_blocks(tokenizer, eval_texts, settings["block_size"])]
    loss = evaluate_lm_loss(model, *blocks)
    # A randomly initialised model would sit near log(vocab) ~ 7.6; the trained weights must give the same loss.
    assert loss == pytest.approx(results["eval_loss_after"], abs=1e-4), (loss, results["eval_loss_after"])


def test_generate_command_reproduces_the_demo_sample(demo_run, capsys):
    out, results, _ = demo_run
    assert main(["generate", "--model", str(out), "--prompt", "def ", "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out == results["sample"] + "\n"


def test_version_flag_and_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    flag_output = capsys.readouterr().out
    assert flag_output.startswith("llama4x ")
    assert main(["version"]) == 0
    assert capsys.readouterr().out == flag_output


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["no-such-command"],
        ["demo", "--no-such-option"],
        ["demo", "--steps", "many"],
        ["generate", "--prompt", "x"],
    ],
)
def test_usage_errors_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_subcommand_errors_print_one_line_without_traceback(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["generate", "--model", str(missing), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "--model" in err and str(missing) in err
    assert "Traceback" not in err
    assert main(["demo", "--steps", "0", "--out", str(tmp_path / "demo")]) == 1
    assert "steps=0" in capsys.readouterr().err


@pytest.mark.parametrize("argv_prefix", [["--debug"], []])
def test_debug_flag_reraises_before_or_after_the_subcommand(tmp_path, argv_prefix):
    argv = [*argv_prefix, "generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]
    if not argv_prefix:
        argv.append("--debug")
    with pytest.raises(ValueError, match="--model"):
        main(argv)


def test_generate_rejects_bad_numbers(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens 0" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--temperature", "-1"]) == 1
    assert "--temperature -1" in capsys.readouterr().err
