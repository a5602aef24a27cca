"""No host synchronisation in llama4x's own code on the hot paths: a training step (MoE routing, balancing losses,
expert loads, bias update) and a cached decode step never read a device tensor back. On a GPU every such read
stalls the host until the device has caught up. Found on the CPU by watching for the operators that read back."""

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llama4x
from llama4x._compat import CACHE_FIELD
from tiny import random_ids, tiny_model

READ_BACK = {"aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.unique", "aten._unique2",
             "aten.masked_select", "aten.item"}  # fmt: skip
PACKAGE = str(Path(llama4x.__file__).parent)


class ReadBacks(TorchDispatchMode):
    """The read-back operators that llama4x's own lines dispatch (not transformers' or torch's), by `file:line`."""

    def __init__(self):
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in READ_BACK:
            caller = [f for f in traceback.extract_stack() if f"{Path(torch.__file__).parent}" not in f.filename][-2]
            if caller.filename.startswith(PACKAGE):  # [-1] is this method
                self.sites[f"{Path(caller.filename).name}:{caller.lineno} {func.overloadpacket}"] += 1
        return func(*args, **(kwargs or {}))


def test_training_step_reads_nothing_back_in_llama4x_code():
    balancing = {"router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.01, "router_bias_update_rate": 0.01}
    model = tiny_model(num_experts_per_tok=2, router_aux_loss_type="sequence", **balancing).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    input_ids = random_ids(2, 12)
    attention_mask = torch.ones_like(input_ids)
    # Left padding. The input checks and the blockwise-chunk decision read back once per forward each, through
    # `.tolist()` (not an operator, so not seen here); nothing per layer may.
    attention_mask[1, :3] = 0
    with ReadBacks() as found:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
        out.loss.backward()
        optimizer.step()  # the balancing-bias update
    assert out.aux_loss > 0 and out.expert_load.sum() > 0
    assert not found.sites, dict(found.sites)


def test_cached_decode_step_reads_nothing_back_in_llama4x_code():
    model = tiny_model(dtype=torch.bfloat16, router_aux_loss_coef=0.01)  # bf16: the GPU path, not experts_cpu
    cache = llama4x.modeling_llama4x.DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(random_ids(1, 12), use_cache=True, **{CACHE_FIELD: cache}).logits
        with ReadBacks() as found:
            out = model(logits[:, -1:].argmax(-1), use_cache=True, **{CACHE_FIELD: cache})
    assert out.aux_loss is None, "generate has no labels: the balancing losses are not computed"
    assert not found.sites, dict(found.sites)
