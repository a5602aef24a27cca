"""One rank of `test_parallelism.py`: loads the checkpoint in `argv[1]` split over two ranks as `argv[4]` says, with
the experts implementation `argv[2]`, and rank 0 saves what it computed to `argv[3]`:
    - `ep`: tensor-parallel attention, routed experts split by expert; `logits_loss_and_ffn_grads`;
    - `tp`: everything by the tensor-parallel plan; `logits_loss_and_ffn_grads`;
    - `pp`: the layers split in two pipeline stages (transformers' pipeline runs inference only); `logits_and_tokens`.
"""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import llama4x  # noqa: F401  (registers the Auto classes)
from tiny import random_ids

SIZES = {"ep": {"tp_size": 2, "ep_size": 2}, "tp": {"tp_size": 2}, "pp": {"pp_size": 2}}


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


@torch.no_grad()
def logits_and_tokens(model: torch.nn.Module) -> dict:
    """Logits of fixed ids (longer than the tiny config's chunk) and 6 greedy tokens generated with the cache."""
    ids = random_ids(2, 9)
    tokens = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    return {"logits": model(ids).logits, "tokens": tokens}


def main(checkpoint: str, implementation: str, out: str, split: str) -> None:
    from transformers.distributed import DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, distributed_config=DistributedConfig(**SIZES[split]), experts_implementation=implementation
    )
    if split == "pp":
        results = logits_and_tokens(model)
    else:
        experts = [layer.feed_forward.experts for layer in model.model.layers if layer.is_moe_layer]
        local_experts = model.config.num_local_experts // (2 if split == "ep" else 1)
        assert all(e._is_expert_parallel == (split == "ep") and e.num_experts == local_experts for e in experts)
        results = logits_loss_and_ffn_grads(model)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()  # no rank exits while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
