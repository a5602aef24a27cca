"""accelerate big-model loading: `from_pretrained(..., device_map="auto", max_memory=...)` places whole decoder (and
vision encoder) layers, offloads to CPU and disk, and gives the single-device logits and generations."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from tiny import random_ids, tiny_model, tiny_multimodal_model

LAYER = re.compile(r"(.*\.)?layers\.\d+")


def module_bytes(model: torch.nn.Module, prefix: str) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n.startswith(prefix))


def assert_no_split_layer(device_map: dict[str, str]) -> None:
    """Every key is a whole layer (`...layers.N`) or coarser: no key names something inside a layer."""
    for key in device_map:
        inside = [m for m in LAYER.finditer(key) if m.end() < len(key)]
        assert not inside, f"{key!r} splits a layer: {device_map}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny MoE checkpoint with non-zero loss-free balancing biases (a buffer that must follow its layer)."""
    model = tiny_model(router_bias_update_rate=0.01)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.model.moe_blocks:
            block.e_score_correction_bias.copy_(torch.randn(block.e_score_correction_bias.shape, generator=generator))
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, reference


def offload_budget(reference) -> str:
    """A CPU budget for the embeddings and about two decoder layers: the rest must go to disk."""
    layer = module_bytes(reference, "model.layers.0.")
    return f"{(module_bytes(reference, 'model.embed_tokens.') + 2.5 * layer) / 1e3:.0f}KB"


def dispatched(folder, reference, tmp_path):
    return AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": offload_budget(reference)}, offload_folder=tmp_path / "offload"
    ).eval()


def test_device_map_offloads_to_cpu_and_disk_in_whole_layers(saved, tmp_path):
    folder, reference = saved
    model = dispatched(folder, reference, tmp_path)
    device_map = model.hf_device_map
    assert {"cpu", "disk"} <= set(device_map.values()), f"not forced to offload: {device_map}"
    assert_no_split_layer(device_map)
    assert any(LAYER.fullmatch(key) for key in device_map), f"layers were not spread over devices: {device_map}"


def test_multimodal_device_map_keeps_vision_and_decoder_layers_whole(tmp_path):
    model = tiny_multimodal_model()
    model.save_pretrained(tmp_path / "mm")
    total = module_bytes(model, "")
    loaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "mm",
        device_map="auto",
        max_memory={"cpu": f"{total * 0.4 / 1e3:.0f}KB"},
        offload_folder=tmp_path / "offload",
    )
    assert "disk" in set(loaded.hf_device_map.values())
    assert_no_split_layer(loaded.hf_device_map)


def test_offloaded_model_matches_single_device_logits_and_generation(saved, tmp_path):
    folder, reference = saved
    model = dispatched(folder, reference, tmp_path)
    ids = random_ids(2, 12)
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 1e-5, f"offloaded vs single-device logits: max diff {diff}"
    prompt = ids[:1, :5]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    expected = reference.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, expected), f"{generated.tolist()} != {expected.tolist()}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_cpu_disk_device_map_matches_single_device(saved, tmp_path):
    folder, reference = saved
    budget = offload_budget(reference)
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={0: budget, "cpu": budget}, offload_folder=tmp_path / "offload"
    ).eval()
    assert {0, "disk"} <= set(model.hf_device_map.values()), model.hf_device_map
    assert_no_split_layer(model.hf_device_map)
    ids = random_ids(2, 12)
    with torch.no_grad():
        diff = (model(ids.to(0)).logits.cpu() - reference(ids).logits).abs().max().item()
    assert diff < 1e-4, f"GPU/CPU/disk vs single-device logits: max diff {diff}"
