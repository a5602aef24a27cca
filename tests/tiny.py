"""The one helper that builds tiny random llama4x configs and models for every test file, and runs code on a
machine where llama4x is not installed."""

import subprocess
import sys
import textwrap

import pytest
import torch

from llama4x import (
    Llama4XConfig,
    Llama4XForCausalLM,
    Llama4XForConditionalGeneration,
    Llama4XTextConfig,
    Llama4XVisionConfig,
)
from llama4x._compat import PACKED_CHUNKED_MASKS

# transformers masks packed sequences (position ids restarting in a row) in chunked layers from 5.23 on.
needs_packed_chunked_masks = pytest.mark.skipif(
    not PACKED_CHUNKED_MASKS, reason="packed sequences in chunked layers need transformers >= 5.23 (refused before)"
)


def tiny_text_config(**overrides) -> Llama4XTextConfig:
    """4 layers (RoPE+chunked / NoPE alternating), hidden 32, 4 heads / 2 kv heads, 8 experts top-2, chunk 8."""
    fields = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "num_shared_experts": 1,
        "no_rope_layer_interval": 2,
        "attention_chunk_size": 8,
        "floor_scale": 4,
        "attn_scale": 0.5,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    fields.update(overrides)
    return Llama4XTextConfig(**fields)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Llama4XForCausalLM:
    """A tiny random `Llama4XForCausalLM` in eval mode; weights drawn with a fixed seed."""
    torch.manual_seed(seed)
    return Llama4XForCausalLM(tiny_text_config(**overrides)).to(dtype).eval()


def random_ids(batch: int, length: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    """Token ids in [3, vocab): never pad/bos/eos."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


# Special tokens of `tiny_multimodal_config`; text ids of its tests start after them.
BOI_ID, EOI_ID, IMAGE_ID = 3, 4, 5
FIRST_TEXT_ID = 6


def tiny_multimodal_config(
    fusion: str = "encoder", vision_overrides: dict | None = None, **text_overrides
) -> Llama4XConfig:
    """`tiny_text_config` plus a tiny vision front-end: 32-pixel tiles of 4x4 patches of 8 pixels; "encoder" is a
    2-layer ViT (hidden 32, 4 heads, pixel shuffle 0.5: 4 tokens per tile), "patch" projects the 16 raw patches."""
    vision = {
        "fusion": fusion,
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 64,
        "projector_output_dim": 64,
        "vision_output_dim": 64,
    }
    vision.update(vision_overrides or {})
    return Llama4XConfig(
        text_config=tiny_text_config(**text_overrides),
        vision_config=Llama4XVisionConfig(**vision),
        image_token_id=IMAGE_ID,
        boi_token_id=BOI_ID,
        eoi_token_id=EOI_ID,
    )


def tiny_multimodal_model(fusion: str = "encoder", seed: int = 0, **text_overrides) -> Llama4XForConditionalGeneration:
    """A tiny random `Llama4XForConditionalGeneration` (`tiny_multimodal_config`) in eval mode, fixed-seed weights."""
    torch.manual_seed(seed)
    return Llama4XForConditionalGeneration(tiny_multimodal_config(fusion, **text_overrides)).eval()


def randomize_to_unit_scale(module: torch.nn.Module, seed: int) -> None:
    """Weights that keep activations O(1) (the default init's 0.02 std leaves outputs ~1e-2, where 1e-5 is a loose
    tolerance) and attention far from uniform (so RoPE and positions matter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 2 and "embedding_vlm" not in name:  # linear weights (out, in)
                gain = 3.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                param.copy_(noise * gain * param.shape[1] ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:  # class and position embeddings
                param.copy_(noise)


_BLOCK_LLAMA4X = """
import sys, importlib.abc

class BlockLlama4x(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "llama4x" or name.startswith("llama4x."):
            raise ImportError("llama4x is not installed here")

sys.meta_path.insert(0, BlockLlama4x())
"""


def run_without_llama4x(code: str, cwd=None) -> str:
    """Run `code` in a fresh Python where `import llama4x` fails (a user without the package); assert it exits 0
    and imported no llama4x module; return its stdout."""
    script = _BLOCK_LLAMA4X + textwrap.dedent(code) + '\nassert "llama4x" not in sys.modules\n'
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
