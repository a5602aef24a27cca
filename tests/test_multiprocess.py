"""`accelerate launch` of scripts/train.py with two CPU processes (DDP, and FSDP2 full-shard, over gloo) against one
process with the same global batch: same losses, same weights, identical loss-free balancing bias on every process.
The model has more experts than a process sees tokens per step, so experts without tokens are certain (gradient
reduction must not hang on them)."""

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
FSDP_CONFIG = Path(__file__).with_name("accelerate_cpu_fsdp2.yaml")
STEPS, PER_PROCESS_BATCH, BLOCK = 4, 2, 8
EXPERTS = 32  # > PER_PROCESS_BATCH * BLOCK tokens per process and step, top-1: at least 16 experts idle per layer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], timeout: int = 180) -> str:
    """Run `command` in the repository root; its stdout. A hang (e.g. a collective waiting on a process whose
    experts got no tokens) fails at `timeout`."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def step_losses(out: Path) -> dict[int, float]:
    results = json.loads((out / "train_results.json").read_text())
    return {entry["step"]: entry["loss"] for entry in results["log_history"] if "loss" in entry}


def assert_same_losses_and_balancing_bias(single: Path, distributed: Path) -> None:
    """The distributed run logged every step's loss equal to the single-process run's, and its processes ended with
    the same balancing bias."""
    expected, got = step_losses(single), step_losses(distributed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}: {got} vs {expected}"
    results = json.loads((distributed / "train_results.json").read_text())["metrics"]
    assert results["moe/balancing_bias_process_spread"] == 0.0, "processes ended with different balancing biases"


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

    assert_same_losses_and_balancing_bias(single, ddp)

    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    final_single, final_ddp = load_file(single / weights), load_file(ddp / weights)
    assert final_single.keys() == final_ddp.keys()
    for name, value in final_single.items():
        diff = (final_ddp[name] - value).abs().max().item()
        assert diff < 1e-4, f"{name}: DDP vs single process differ by {diff}"
    if not lora:
        bias = "model.layers.0.feed_forward.e_score_correction_bias"
        assert final_single[bias].abs().max() > 0 and torch.equal(final_single[bias], final_ddp[bias])


# Wraps scripts/train.py and reports after training whether the Trainer really sharded the model: accelerate drops FSDP
# for CPU processes and trains with DDP instead unless llama4x.training.enable_cpu_fsdp puts it back. Each rank writes its
# own report file: the ranks share one stdout, where a line of one can land inside an unfinished line of the other.
FSDP_PROBE = """
import os, sys
from pathlib import Path
from torch.distributed.tensor import DTensor
from llama4x import training

class Probe(training.Llama4XTrainer):
    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        params = list(self.model.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        report = Path(__file__).with_name(f"probe_rank{os.environ['RANK']}.txt")
        report.write_text(f"fsdp2={self.accelerator.is_fsdp2} sharded={sharded}/{len(params)}")
        return output

training.Llama4XTrainer = Probe
training.main(sys.argv[1:])
"""


def test_two_process_fsdp2_matches_single_process_with_the_same_global_batch(tmp_path):
    model = save_tiny_checkpoint(
        tmp_path / "model",
        num_local_experts=EXPERTS,
        num_experts_per_tok=1,
        router_bias_update_rate=0.01,
        router_z_loss_coef=1e-3,
    )
    data = write_text(tmp_path / "docs.txt")
    probe = tmp_path / "train_probe.py"
    probe.write_text(FSDP_PROBE)
    extra = {"use_cpu": "true", "eval_fraction": 0, "block_size": BLOCK}
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    single_args = train_args(model, data, single, STEPS, **extra, per_device_train_batch_size=2 * PER_PROCESS_BATCH)
    fsdp_args = train_args(model, data, fsdp, STEPS, **extra, per_device_train_batch_size=PER_PROCESS_BATCH)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    stdout = run([*launch, "--main_process_port", str(free_port()), str(probe), *fsdp_args], timeout=120)
    run([sys.executable, "scripts/train.py", *single_args])

    reports = sorted(tmp_path.glob("probe_rank*.txt"))
    assert [report.name for report in reports] == ["probe_rank0.txt", "probe_rank1.txt"], stdout[-3000:]
    for line in (report.read_text() for report in reports):
        # every parameter of every process is a DTensor shard, not a DDP replica
        sharded, total = line.rsplit("sharded=", 1)[1].split("/")
        assert "fsdp2=True" in line and sharded == total, f"FSDP was not applied (DDP instead?): {line}"

    assert_same_losses_and_balancing_bias(single, fsdp)

    final_single, final_fsdp = load_file(single / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert final_single.keys() == final_fsdp.keys()  # the full state dict, gathered from the shards
    for name, value in final_single.items():
        diff = (final_fsdp[name] - value).abs().max().item()
        assert diff < 1e-4, f"{name}: FSDP vs single process differ by {diff}"
    bias = "model.layers.0.feed_forward.e_score_correction_bias"
    assert final_single[bias].abs().max() > 0 and torch.equal(final_single[bias], final_fsdp[bias])
