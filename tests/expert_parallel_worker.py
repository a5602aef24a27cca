"""One rank of `test_expert_parallel.py`: loads the checkpoint in `argv[1]` split over the ranks (tensor-parallel
attention; routed experts split by expert when `argv[4]` is `ep`, else tensor-parallel too), then rank 0 saves
`logits_loss_and_ffn_grads` to `argv[3]`, computed with the experts implementation `argv[2]`."""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import llama4x  # noqa: F401  (registers the Auto classes)
from tiny import random_ids


def logits_loss_and_ffn_grads(model: torch.nn.Module) -> dict:
    """Logits of fixed ids, then a training step's loss on them and the full gradient of every FFN weight (router,
    routed and shared experts, dense MLPs); sharded tensors gathered whole."""
    ids = random_ids(2, 9)
    with torch.no_grad():
        logits = model(ids).logits
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if ".feed_forward." in name}
    grads = {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}
    return {"logits": logits, "loss": loss.detach(), "grads": grads}


def main(checkpoint: str, implementation: str, out: str, split: str) -> None:
    from transformers.distributed import DistributedConfig

    sizes = {"tp_size": 2, "ep_size": 2} if split == "ep" else {"tp_size": 2}
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, distributed_config=DistributedConfig(**sizes), experts_implementation=implementation
    )
    experts = [layer.feed_forward.experts for layer in model.model.layers if layer.is_moe_layer]
    local_experts = model.config.num_local_experts // (2 if split == "ep" else 1)
    assert all(e._is_expert_parallel == (split == "ep") and e.num_experts == local_experts for e in experts)
    results = logits_loss_and_ffn_grads(model)
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
