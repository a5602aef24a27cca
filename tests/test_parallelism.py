"""Expert, tensor and pipeline parallelism through transformers' distributed API and llama4x's `base_model_ep_plan`
/ `base_model_tp_plan` / `base_model_pp_plan`: two CPU processes (gloo) against one process holding the whole model.

- Expert and tensor parallelism: attention split by the tensor-parallel plan, the routed experts either by expert
  (each process holds half of them) or by the tensor-parallel plan. The same logits, training loss and FFN
  gradients, for each experts implementation. At inference the processes share the batch and each computes its own
  experts' pairs (the others arrive as ids `>= num_experts`, which every implementation must skip); in training the
  pairs travel all-to-all.
- Pipeline parallelism (inference only in transformers): two stages of two layers. The same logits and the same
  cached greedy tokens: the second stage's caches for the first stage's layers stay empty, so its positions and
  chunked masks must come from the layers it runs."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_worker import logits_and_tokens, logits_loss_and_ffn_grads
from test_multiprocess import ROOT, free_port
from tiny import tiny_model


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run_on_two_processes(tmp_path: Path, implementation: str, split: str) -> dict:
    """`parallel_worker.py` under `torch.distributed.run` on the checkpoint in `tmp_path / "model"`; rank 0's results."""
    worker = Path(__file__).with_name("parallel_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(worker), str(tmp_path / "model"), implementation, str(tmp_path / "rank0.pt"), split]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    return torch.load(tmp_path / "rank0.pt")


@pytest.mark.skipif(
    not has_module("transformers.distributed.expert_parallel"),
    reason="this transformers has no `ep_size` or `ep_dispatch_experts` (5.17 has not, 5.24 has), which llama4x's plan uses",
)
@pytest.mark.parametrize(
    "implementation, split, moe_layers",
    [("grouped_mm", "ep", None), ("batched_mm", "ep", None), ("eager", "ep", None), ("grouped_mm", "tp", None),
     ("grouped_mm", "ep", [1, 3]), ("grouped_mm", "tp", [1, 3])],
    ids=["ep-grouped_mm", "ep-batched_mm", "ep-eager", "tp-grouped_mm", "ep-dense-and-moe", "tp-dense-and-moe"],
)  # fmt: skip
def test_expert_and_tensor_parallel_processes_match_one_process(implementation, split, moe_layers, tmp_path):
    """`moe_layers` [1, 3]: dense MLPs in layers 0 and 2, so the plans' dense-MLP rules match parameters too."""
    model = tiny_model(seed=0, **({} if moe_layers is None else {"moe_layers": moe_layers}))
    model.save_pretrained(tmp_path / "model")
    expected = logits_loss_and_ffn_grads(model)
    got = run_on_two_processes(tmp_path, implementation, split)
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-6, atol=1e-6)
    assert sorted(got["grads"]) == sorted(expected["grads"])
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(
            got["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.skipif(
    not has_module("transformers.distributed.pipeline_parallel"),
    reason="this transformers has no pipeline parallelism",
)
def test_pipeline_parallel_stages_match_one_process_in_logits_and_cached_generation(tmp_path):
    model = tiny_model(seed=0, moe_layers=[1, 3])  # stage 1: a dense and an MoE layer, chunked and global
    model.save_pretrained(tmp_path / "model")
    expected = logits_and_tokens(model)
    got = run_on_two_processes(tmp_path, "grouped_mm", "pp")
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["tokens"], expected["tokens"])


@pytest.mark.skipif(
    not has_module("transformers.distributed.pipeline_parallel"),
    reason="this transformers has no pipeline parallelism",
)
def test_pipeline_stages_of_the_multimodal_model_are_refused_with_the_way_out(tmp_path):
    """transformers' pipeline looks for the decoder's `layers` on the base model; the multimodal model keeps them in
    its `language_model` (without this check: an AttributeError on every rank)."""
    from transformers.distributed import DistributedConfig

    from llama4x import Llama4XForConditionalGeneration
    from tiny import tiny_multimodal_model

    tiny_multimodal_model().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"pp_size=2.*Llama4XForCausalLM"):
        Llama4XForConditionalGeneration.from_pretrained(
            tmp_path / "model", distributed_config=DistributedConfig(pp_size=2)
        )
