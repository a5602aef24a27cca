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


@pytest.mark.parametrize(
    "argv, named",
    [
        (["bench", "speed", "--only", "train", "nosuch"], "--only nosuch"),
        (["bench", "train", "--device", "gpu"], "--device 'gpu'"),
        (["bench", "speed", "--device", "mps"], "--device 'mps'"),
    ],
)
def test_bench_refuses_unknown_sections_and_devices_before_running_anything(argv, named, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 1
    assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was benchmarked


def test_bench_only_needs_a_section(tmp_path, capsys):
    """An empty `--only` used to mean "no filter": the whole suite."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "speed", "--only", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--only: expected at least one argument" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


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


TINY_SHAPES = ["--hidden-size", "32", "--num-hidden-layers", "2", "--num-attention-heads", "2",
               "--num-key-value-heads", "1", "--moe-intermediate-size", "32", "--num-local-experts", "4",
               "--vocab-size", "64", "--attention-chunk-size", "16"]  # fmt: skip


@pytest.mark.parametrize(
    "argv, rows",
    [
        (["moe-layer", "--hidden", "32", "--expert-size", "16", "--experts", "4", "--tokens", "64"],
         ["forward_s", "forward_backward_s"]),
        (["grouped-gemm", "--hidden", "32", "--expert-size", "16", "--experts", "4", "--top-k", "2", "--tokens", "64"],
         ["gate_up/forward_s", "down/forward_backward_s"]),
        (["train", *TINY_SHAPES, "--batch", "2", "--seq", "32"], ["step_s", "tokens_per_s"]),
        (["train", *TINY_SHAPES, "--num-hidden-layers", "1", "--batch", "2", "--seq", "32", "--compile",
          "--dtype", "bfloat16"], ["step_s", "tokens_per_s"]),  # bf16: compiles on every supported transformers
        (["decode", *TINY_SHAPES, "--batch", "1", "2", "--prompt", "8", "--new-tokens", "4"],
         ["batch_1/tokens_per_s", "batch_2/tokens_per_s"]),
        (["decode", *TINY_SHAPES, "--batch", "2", "--prompt", "8", "--new-tokens", "4",
          "--experts-implementation", "batched_mm"], ["batch_2/tokens_per_s", "batch_2/weights_read_gib_per_call"]),
        (["decode-overhead", *TINY_SHAPES, "--prompt", "8", "--steps", "2"], ["operators_per_step", "step_ms"]),
        (["long-context", *TINY_SHAPES, "--lengths", "64", "128"], ["64/prefill_s", "128/prefill_s"]),
        (["kv-cache", *TINY_SHAPES, "--lengths", "64"], []),
        (["lora", *TINY_SHAPES, "--batch", "2", "--seq", "32", "--rank", "2"], ["step_s", "vs_frozen_base"]),
    ],
    ids=["moe-layer", "grouped-gemm", "train", "train-compiled", "decode", "decode-batched-mm", "decode-overhead", "long-context", "kv-cache", "lora"],
)  # fmt: skip
def test_speed_benchmarks_print_ratios_and_write_json(argv, rows, tmp_path, capsys):
    import json

    repeats = [] if argv[0] == "decode-overhead" else ["--repeats", "1"]
    assert main(["bench", *argv, *repeats, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in rows:
        assert any(line.startswith(f"{row}: ") and "(1.00x)" in line for line in out.splitlines()), (row, out)
    written = json.loads((tmp_path / f"bench_{argv[0]}_cpu.json").read_text())
    assert written["environment"]["torch"] and written["results"]


def test_grouped_gemm_refuses_a_top_k_above_the_expert_count(capsys):
    argv = ["bench", "grouped-gemm", "--experts", "4", "--top-k", "5", "--tokens", "8", "--out", "unused"]
    assert main(argv) != 0
    assert "--top-k 5: expected a top-k between 1 and --experts 4" in capsys.readouterr().err


def test_moe_layer_profile_writes_op_tables_of_llama4x_and_dense(tmp_path):
    argv = ["bench", "moe-layer", "--hidden", "32", "--expert-size", "16", "--experts", "4", "--tokens", "64"]
    assert main([*argv, "--repeats", "1", "--profile", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "profile_moe-layer_cpu.txt").read_text()
    assert "== llama4x, forward+backward" in text and "== dense_llama, forward+backward" in text
    assert text.count("aten::mm") >= 2  # each table lists the matmuls


def test_kv_cache_of_chunked_layers_is_bounded_by_the_chunk(tmp_path):
    import json

    argv = ["bench", "kv-cache", *TINY_SHAPES, "--lengths", "64", "256", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "bench_kv-cache_cpu.json").read_text())["results"]
    short, long = results["64"], results["256"]
    for name in ("llama4x", "transformers_llama4"):  # 2 layers: chunked (chunk 16) + global (NoPE every 4th: none)
        chunked = {
            length: r[name]["per_layer_kind_mib"].get("DynamicSlidingWindowLayer") for length, r in results.items()
        }
        assert chunked["64"] == chunked["256"] > 0, f"{name}: chunked layers grew with the sequence"
    assert long["dense_llama"]["total_mib"] == 4 * short["dense_llama"]["total_mib"]


def test_useful_flops_count_active_weights_and_attention_by_hand():
    from llama4x.benchmarks.flops import active_matmul_params, attention_flops_per_token, moe_layer_flops
    from tiny import tiny_model

    model = tiny_model()  # hidden 32, 4 layers all MoE: 8 experts of 16, top-2, 1 shared; 4 heads x 8, 2 kv heads
    H, E, inter, V = 32, 8, 16, 97
    attention = H * 32 + 2 * H * 16 + 32 * H  # q, k, v, o
    moe = H * E + 2 * (3 * H * inter) + 3 * H * inter  # router, top-2 routed, shared
    assert active_matmul_params(model, top_k=2) == 4 * (attention + moe) + V * H  # + LM head
    # chunk 8, NoPE every 2nd layer: 2 chunked layers (mean keys in a chunk of 8: 4.5), 2 global (mean (16+1)/2).
    assert attention_flops_per_token(model.config, 16) == 2 * 4 * 32 * 4.5 + 2 * 4 * 32 * 8.5
    assert moe_layer_flops(H, inter, E, 2, tokens=10) == 2 * 10 * (H * E + 3 * 3 * H * inter)


def test_cpu_peak_memory_sees_a_large_temporary_tensor():
    import torch

    from llama4x.benchmarks.speed import _peak_memory_gib

    def make_and_drop():
        buffer = torch.ones(64 * 2**20)  # 256 MiB, freed on return
        return float(buffer[0])

    peak = _peak_memory_gib(torch.device("cpu"), make_and_drop)
    assert 0.2 < peak < 0.6, peak
