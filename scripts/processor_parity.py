"""Pixel parity of Llama4XImageProcessor with transformers' Llama4ImageProcessor (which needs torchvision, so
this runs where torchvision imports; CI's machine has none), plus a CUDA check of the multimodal conversion.

    PYTHONPATH=src python scripts/processor_parity.py --out results/
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from llama4x import Llama4XForConditionalGeneration, Llama4XImageProcessor  # noqa: E402
from llama4x.conversion import config_from_llama4, state_dict_from_llama4  # noqa: E402

SIZES = [(336, 336), (200, 500), (900, 100), (1200, 1600), (40, 40), (3000, 700)]  # (height, width)


def pixel_parity(max_patches: int) -> list[dict]:
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    reference, ours = Llama4ImageProcessor(max_patches=max_patches), Llama4XImageProcessor(max_patches=max_patches)
    rows = []
    rng = np.random.default_rng(0)
    for height, width in SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = reference(images=[image], return_tensors="pt")
        actual = ours(images=[image], return_tensors="pt")
        same_shape = tuple(expected["pixel_values"].shape) == tuple(actual["pixel_values"].shape)
        row = {
            "size_hw": [height, width],
            "max_patches": max_patches,
            "reference_shape": list(expected["pixel_values"].shape),
            "llama4x_shape": list(actual["pixel_values"].shape),
            "same_aspect_ratios": bool(torch.equal(expected["aspect_ratios"].cpu(), actual["aspect_ratios"].cpu())),
        }
        if same_shape:
            diff = (expected["pixel_values"].float() - actual["pixel_values"].float()).abs()
            row.update(max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item())
        rows.append(row)
    return rows


def multimodal_cuda_parity() -> dict:
    from transformers import Llama4ForConditionalGeneration

    from test_conversion import llama4_multimodal_config, llama4_multimodal_logits
    from tiny import random_ids, randomize_to_unit_scale

    torch.manual_seed(0)
    reference = Llama4ForConditionalGeneration(llama4_multimodal_config()).eval()
    randomize_to_unit_scale(reference.vision_model, seed=1)
    model = Llama4XForConditionalGeneration(config_from_llama4(reference.config)).eval()
    model.load_state_dict(state_dict_from_llama4(reference.state_dict()))
    reference, model = reference.cuda(), model.cuda()
    ids = torch.cat([random_ids(1, 4), torch.tensor([[4] + [6] * 12 + [5]]), random_ids(1, 6)], dim=1).cuda()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        expected = llama4_multimodal_logits(reference, ids, pixels)
        actual = model(input_ids=ids, pixel_values=pixels).logits
    cached = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12, do_sample=False, pad_token_id=0)
    recomputed = model.generate(
        input_ids=ids, pixel_values=pixels, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False
    )
    return {
        "fp32_max_abs_diff": (actual - expected).abs().max().item(),
        "generate_cache_equals_recompute": bool(torch.equal(cached, recomputed)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    results = {"pixel_parity": pixel_parity(16) + pixel_parity(4)}
    if torch.cuda.is_available():
        results["multimodal_cuda"] = multimodal_cuda_parity()
    print(json.dumps(results, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "processor_parity.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
