"""Like with like in the speed benchmarks (`llama4x.benchmarks.speed`): every model decodes the same unpadded
prompt, and peak memory on the CPU counts the tensors a call allocates, whatever ran before it."""

import torch

from llama4x.benchmarks.speed import _greedy_generate, _peak_memory_gib
from tiny import random_ids, tiny_model


def test_decode_prompts_containing_the_pad_token_id_are_attended_in_full():
    model = tiny_model(eos_token_id=None)  # chunk 8: the blockwise chunked layers, no EOS to suppress
    prompt = random_ids(1, 20)
    prompt[0, [4, 11]] = 0  # the pad token id the benchmark passes to `generate`; random prompts contain it
    ids, expected = prompt, []
    with torch.no_grad():
        for _ in range(3):  # greedy recomputation without a cache or a mask
            logits = model(ids).logits[:, -1]
            expected.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        out = _greedy_generate(model, prompt, 3, output_logits=True, return_dict_in_generate=True)
    diff = max((got - want).abs().max().item() for got, want in zip(out.logits, expected, strict=True))
    assert diff < 1e-5, f"max logit difference {diff}"
    assert torch.equal(out.sequences, ids), (out.sequences, ids)


def test_cpu_peak_memory_counts_the_tensors_even_after_the_allocator_kept_freed_memory():
    def hold_32_mib():
        blocks = [torch.ones(2**18) for _ in range(32)]  # 32 tensors of 1 MiB alive at once
        return sum(float(block[0]) for block in blocks)

    cpu = torch.device("cpu")
    first = _peak_memory_gib(cpu, hold_32_mib)
    freed = torch.ones(2**23)  # 32 MiB, then freed: glibc serves later blocks up to that size from memory it keeps
    del freed
    second = _peak_memory_gib(cpu, hold_32_mib)
    assert first == second == 32 / 1024, (first, second)
