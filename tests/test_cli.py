"""Tests for the `llama4x` command: version, usage errors and error handling (the demo: test_demo.py)."""

import pytest

from llama4x.cli import main


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
        ["demo", "--minutes", "many"],
        ["demo", "--fusion", "cross-attention"],
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
    assert main(["demo", "--minutes", "0", "--out", str(tmp_path / "demo")]) == 1
    assert "`minutes`=0" in capsys.readouterr().err


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
