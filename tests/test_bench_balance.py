"""Tests for the load-balancing benchmark (`llama4x bench balance`): a quick run end to end, its outputs, the
loss-free bias update, shared initialisation and data order, and the command-line wiring."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama4x.benchmarks.balance import VARIANTS, batch_schedule, run_balance_benchmark
from llama4x.cli import make_parser

STEPS, RATE = 4, 0.001
PNGS = ["max_violation.png", "lm_loss.png", "expert_load_heatmap.png"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick benchmark run (4 steps per variant, 2 held-out blocks, a history entry every step)."""
    out = tmp_path_factory.mktemp("bench") / "balance"
    summary = run_balance_benchmark(
        out, steps=STEPS, quick=True, eval_blocks=2, log_every=1, bias_update_rate=RATE, verbose=False
    )
    return out, summary


def test_quick_run_writes_json_markdown_table_and_three_pngs(quick_run):
    out, summary = quick_run
    for name in ["results.json", "results.md", *PNGS]:
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    table = (out / "results.md").read_text()
    assert table.count("\n| (") == len(VARIANTS), table


def test_results_have_all_four_variants_with_finite_metrics(quick_run):
    _, summary = quick_run
    results = json.loads(json.dumps(summary))["variants"]
    assert list(results) == list(VARIANTS)
    for name, r in results.items():
        e = r["eval"]
        numbers = [e["lm_loss"], e["max_violation"], e["load_entropy"], r["final_train_lm_loss"], r["train_seconds"]]
        assert all(math.isfinite(x) for x in numbers), (name, numbers)
        assert 0 < e["load_entropy"] <= 1 + 1e-9 and e["max_violation"] >= 0, (name, e)
        assert len(e["expert_load"]) == len(e["max_violation_per_layer"]) == 4, name  # tiny: 4 MoE layers
        assert sum(map(sum, e["expert_load"])) == 4 * e["tokens"] + 4 * summary["settings"]["eval_blocks"], name
        assert [h["step"] for h in r["history"]] == list(range(1, STEPS + 1)), name


def test_loss_free_variant_changed_its_bias_buffers_by_sign_steps(quick_run):
    _, summary = quick_run
    results = summary["variants"]
    for name in ["no_balancing", "aux_loss"]:
        assert results[name]["e_score_correction_bias"] is None, name
    bias_LE = torch.tensor(results["loss_free"]["e_score_correction_bias"], dtype=torch.float64)
    assert bias_LE.shape == (4, 16)
    assert (bias_LE.abs().amax(dim=-1) > 0).all(), f"a layer's bias never moved: {bias_LE}"
    # One update of +-RATE per optimizer step: the bias is a multiple of RATE bounded by STEPS * RATE.
    assert bias_LE.abs().max() <= STEPS * RATE + 1e-6, bias_LE.abs().max()
    off_grid = (bias_LE / RATE - (bias_LE / RATE).round()).abs().max()
    assert off_grid < 1e-3, f"bias is not a multiple of the rate: max off-grid {off_grid}"


def test_all_variants_start_from_the_same_weights_and_first_batch(quick_run):
    # Step 1 runs before any update (the loss-free bias is still zero), so every variant reports the same numbers.
    _, summary = quick_run
    first = [r["history"][0] for r in summary["variants"].values()]
    for key in ["lm_loss", "max_violation", "load_entropy"]:
        values = [h[key] for h in first]
        assert max(values) - min(values) < 1e-5, (
            f"{key} at step 1 differs across variants by {max(values) - min(values)}"
        )


def test_batch_schedule_gives_full_batches_of_distinct_blocks_and_reshuffles_each_epoch():
    schedule = batch_schedule(num_blocks=10, batch_size=3, steps=7, seed=0)  # 3 batches per epoch
    assert schedule.shape == (7, 3)
    assert all(len(set(row.tolist())) == 3 for row in schedule)
    first_epoch = schedule[:3].reshape(-1).tolist()
    assert len(set(first_epoch)) == 9 and schedule[3:6].reshape(-1).tolist() != first_epoch


def test_unknown_variant_and_bad_budget_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown variant 'sinkhorn'"):
        run_balance_benchmark(tmp_path, variants=["sinkhorn"], verbose=False)
    with pytest.raises(ValueError, match="steps=0"):
        run_balance_benchmark(tmp_path, steps=0, verbose=False)
    with pytest.raises(ValueError, match="bias_update_rate=0"):
        run_balance_benchmark(tmp_path, bias_update_rate=0, verbose=False)


def test_cli_parses_the_options_and_the_script_delegates_to_it(capsys):
    argv = ["--quick", "--steps", "3", "--out", "x", "--seed", "5", "--bias-update-rate", "0.01"]
    args = make_parser().parse_args(["bench", "balance", *argv])
    assert args.func.__name__ == "_cmd_bench_balance"
    assert (args.quick, args.steps, args.out, args.seed, args.bias_update_rate, args.aux_loss_coef) == (
        True, 3, "x", 5, 0.01, 0.01,
    )  # fmt: skip
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_balance.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(script.parents[1] / "src")})  # fmt: skip
    assert result.returncode == 0 and "--bias-update-rate" in result.stdout
