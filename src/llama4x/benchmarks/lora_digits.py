"""LoRA fine-tuning on digits: a model pretrained to read digits learns a new answer set through LoRA alone.

1. A tiny multimodal llama4x (ViT front-end, MoE decoder) is trained from scratch with `llama4x.training.train` on
   the bundled digits VQA ("What digit is this?" -> "7"); its digit accuracy on the held-out scans is measured.
2. The new task asks "Is this digit even or odd?" about the same kinds of scans (answers "even" / "odd"), written as
   image-text jsonl (PNG files + prompt + answer) and trained with `--lora` (attention, routed experts, router);
   the base weights stay frozen.
3. Parity accuracy on the held-out scans (greedy generation, exact match) before and after LoRA; chance is 50%.

    python scripts/bench_lora_digits.py --out benchmarks/lora_digits
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..data import DIGITS_QUESTION, PARITY_QUESTION, digits_vqa, parity, parity_records, python_docs_texts
from ..evaluation import answer_accuracy

__all__ = [
    "PARITY_QUESTION",
    "build_pretrain_folder",
    "parity",
    "run_lora_digits_benchmark",
    "write_image_text_jsonl",
]

TILE = 32


def build_pretrain_folder(folder: Path, seed: int = 0) -> Path:
    """Save a new tiny multimodal llama4x and its processor (tokenizer trained on a little bundled text)."""
    from transformers import set_seed

    from ..configuration_llama4x import SPECIAL_TOKEN_PRESETS, Llama4XConfig, Llama4XTextConfig, Llama4XVisionConfig
    from ..modeling_multimodal import Llama4XForConditionalGeneration
    from ..processing_llama4x import Llama4XImageProcessor, Llama4XProcessor
    from ..tokenization import train_tokenizer

    texts = python_docs_texts()[:20] + [DIGITS_QUESTION, PARITY_QUESTION, "even odd 0 1 2 3 4 5 6 7 8 9"]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    vision = Llama4XVisionConfig.from_preset("tiny", image_size=TILE)
    processor = Llama4XProcessor(
        Llama4XImageProcessor(size=TILE, max_patches=1), tokenizer, patch_size=vision.patch_size,
        pixel_shuffle_ratio=vision.pixel_shuffle_ratio,
    )  # fmt: skip
    text = Llama4XTextConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Llama4XConfig(text_config=text, vision_config=vision, **SPECIAL_TOKEN_PRESETS["tiny"])
    set_seed(seed)
    Llama4XForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_image_text_jsonl(records: list[dict[str, Any]], folder: Path, name: str) -> Path:
    """`records` as `name.jsonl` (image path, prompt, answer) next to a folder of PNG files."""
    images = folder / f"{name}_images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(records):
        path = images / f"{i:05d}.png"
        record["image"].save(path)
        lines.append(json.dumps({"image": str(path.relative_to(folder)), "prompt": record["question"],
                                 "answer": record["answer"]}))  # fmt: skip
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _training_arguments(output_dir: Path, steps: int, lr: float, batch: int, seed: int):
    from ..training import Llama4XTrainingArguments

    return Llama4XTrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )


def run_lora_digits_benchmark(
    out: str | Path,
    pretrain_steps: int = 600,
    lora_steps: int = 300,
    seed: int = 0,
    lora_parts: str = "attention,routed_experts,router",
    lora_r: int = 8,
    reuse_pretrained: bool = False,
) -> dict[str, Any]:
    """Run the three phases; write `results.json` (and the training runs' plots) to `out`; return the results.
    `reuse_pretrained` skips phase 1 when `out/pretrain` already holds a finished pretraining run."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..training import DataArguments, LoraArguments, ModelArguments, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_records, test_records = digits_vqa(image_size=TILE)
    parity_train, parity_test = parity_records(train_records), parity_records(test_records)

    # 1. Pretraining on digit answers (skipped when `out/pretrain` holds a finished run and `reuse_pretrained`).
    pretrain_dir = out / "pretrain"
    if reuse_pretrained and (pretrain_dir / "train_results.json").is_file():
        pretrain_metrics = json.loads((pretrain_dir / "train_results.json").read_text())["metrics"]
    else:
        base = build_pretrain_folder(out / "init", seed)
        pretrain_metrics = train(
            ModelArguments(model=str(base)),
            DataArguments(dataset="digits"),
            LoraArguments(),
            _training_arguments(pretrain_dir, pretrain_steps, 3e-3, 32, seed),
        )
    processor = AutoProcessor.from_pretrained(pretrain_dir)
    model = AutoModelForImageTextToText.from_pretrained(pretrain_dir)
    digit_accuracy = answer_accuracy(model, processor, test_records)
    parity_before = answer_accuracy(model, processor, parity_test)
    pretrain_seconds = time.perf_counter() - start

    # 2. LoRA on the parity answers (image-text jsonl).
    data_dir = out / "parity_data"
    train_file = write_image_text_jsonl(parity_train, data_dir, "train")
    test_file = write_image_text_jsonl(parity_test, data_dir, "test")
    lora_dir = out / "lora"
    lora_start = time.perf_counter()
    lora_metrics = train(
        ModelArguments(model=str(pretrain_dir)),
        DataArguments(dataset=str(train_file), eval_dataset=str(test_file)),
        LoraArguments(lora=True, lora_parts=lora_parts, lora_r=lora_r, lora_alpha=2.0 * lora_r),
        _training_arguments(lora_dir, lora_steps, 2e-3, 32, seed),
    )
    lora_seconds = time.perf_counter() - lora_start
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(pretrain_dir), lora_dir)
    trainable = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n or "modules_to_save" in n)
    parity_after = answer_accuracy(adapted.merge_and_unload(), processor, parity_test)
    total = sum(p.numel() for p in model.parameters())

    results = {
        "digit_accuracy_after_pretraining": digit_accuracy,
        "parity_accuracy_before_lora": parity_before,
        "parity_accuracy_after_lora": parity_after,
        "parity_chance": 0.5,
        "test_examples": len(parity_test),
        "lora_parts": lora_parts,
        "lora_r": lora_r,
        "lora_adapter_parameters": trainable,
        "model_parameters": total,
        "pretrain_steps": pretrain_steps,
        "lora_steps": lora_steps,
        "pretrain_final_train_loss": pretrain_metrics.get("train_loss"),
        "lora_eval_accuracy_teacher_forced": lora_metrics.get("eval_accuracy"),
        "pretrain_seconds": round(pretrain_seconds, 1),  # includes the accuracy measurements
        "lora_seconds": round(lora_seconds, 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "seed": seed,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
