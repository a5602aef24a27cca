"""`accelerate launch` of scripts/train.py with two CPU processes (DDP over gloo) against one process with the same
global batch: same losses, same weights, identical loss-free balancing bias on every process. The model has more
experts than a process sees tokens per step, so experts without tokens are certain (DDP must not hang on them)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import save_tiny_checkpoint, train_args, write_text

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG = Path(__file__).with_name("accelerate_cpu_ddp.yaml")
STEPS, PER_PROCESS_BATCH, BLOCK = 4, 2, 8
EXPERTS = 32  # > PER_PROCESS_BATCH * BLOCK tokens per process and step, top-1: at least 16 experts idle per layer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], timeout: int = 180) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def step_losses(out: Path) -> dict[int, float]:
    results = json.loads((out / "train_results.json").read_text())
    return {entry["step"]: entry["loss"] for entry in results["log_history"] if "loss" in entry}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_process_ddp_matches_single_process_with_the_same_global_batch(tmp_path, lora):
    model = save_tiny_checkpoint(
        tmp_path / "model",
        num_local_experts=EXPERTS,
        num_experts_per_tok=1,
        router_bias_update_rate=0.01,
        router_z_loss_coef=1e-3,  # a per-batch mean: checks the Trainer's balancing-loss weighting under DDP
    )
    data = write_text(tmp_path / "docs.txt")
    extra = {"use_cpu": "true", "ddp_broadcast_buffers": "false", "eval_fraction": 0, "block_size": BLOCK}
    lora_args = ["--lora", "--lora_parts", "attention,routed_experts,router", "--lora_r", "4"] if lora else []
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single_args = train_args(model, data, single, STEPS, **extra, per_device_train_batch_size=2 * PER_PROCESS_BATCH)
    ddp_args = train_args(model, data, ddp, STEPS, **extra, per_device_train_batch_size=PER_PROCESS_BATCH)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG)]
    run([*launch, "--main_process_port", str(free_port()), "scripts/train.py", *ddp_args, *lora_args])
    run([sys.executable, "scripts/train.py", *single_args, *lora_args])

    expected, got = step_losses(single), step_losses(ddp)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}: {got} vs {expected}"
    results = json.loads((ddp / "train_results.json").read_text())["metrics"]
    assert results["moe/balancing_bias_process_spread"] == 0.0, "processes ended with different balancing biases"

    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    final_single, final_ddp = load_file(single / weights), load_file(ddp / weights)
    assert final_single.keys() == final_ddp.keys()
    for name, value in final_single.items():
        diff = (final_ddp[name] - value).abs().max().item()
        assert diff < 1e-4, f"{name}: DDP vs single process differ by {diff}"
    if not lora:
        bias = "model.layers.0.feed_forward.e_score_correction_bias"
        assert final_single[bias].abs().max() > 0 and torch.equal(final_single[bias], final_ddp[bias])
