"""The distillation report: quality, size and speed of a teacher and its students, as markdown, JSON and a plot.

Quality (`llama4x.evaluation`): held-out perplexity, `exp` of the mean next-token cross-entropy over the supervised
tokens (labels -100 excluded; the models' balancing losses are left out), and for multimodal runs the exact-match
accuracy of greedy answers to the held-out digits questions. Size: parameters; active parameters per token (all parameters minus, in
each MoE layer, the routed experts a token does not use: `(E - K)` experts' weights; embeddings, LM head and vision
tower included); parameter memory (bytes of the parameters in their dtype). Speed: greedy decoding tokens/s at batch
size 1 with the KV cache, after a warm-up, best of a few runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .evaluation import answer_accuracy, evaluating, perplexity

REPORT_NAME = "distillation_report"


def parameter_summary(model: torch.nn.Module) -> dict[str, int]:
    """`parameters`, `active_parameters` (per token, see the module docstring) and `parameter_bytes`."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if hasattr(module, "experts") and hasattr(module, "router"):  # an MoE block
            experts, config = module.experts, module.config
            per_expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
            inactive += (config.num_local_experts - config.num_experts_per_tok) * per_expert
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"parameters": total, "active_parameters": total - inactive, "parameter_bytes": nbytes}


def decode_tokens_per_second(
    model: torch.nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 5
) -> float:
    """Greedy decoding speed at batch size 1: `new_tokens` / the best wall time of `repeats` runs."""
    settings = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": 0}
    best = float("inf")
    with evaluating(model) as device:
        prompt_ids = prompt_ids[:1].to(device)
        model.generate(input_ids=prompt_ids, **{**settings, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            if prompt_ids.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(input_ids=prompt_ids, **settings)
            if prompt_ids.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return new_tokens / best


def _markdown(results: dict[str, Any]) -> str:
    models = results["models"]
    has_accuracy = any(m.get("digits_accuracy") is not None for m in models.values())
    header = ["model", "held-out perplexity"] + (["digits accuracy"] if has_accuracy else [])
    header += ["parameters", "active parameters", "parameter memory (MB)", "decode tokens/s"]
    lines = ["# Distillation report\n", f"Teacher: `{results.get('teacher', '')}`; student kind: "
             f"`{results.get('student_kind', '')}`; {results.get('steps', '?')} training steps for each student.\n",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]  # fmt: skip
    for name, m in models.items():
        row = [name, f"{m['perplexity']:.3f}"]
        if has_accuracy:
            row.append(f"{m['digits_accuracy']:.3f}" if m.get("digits_accuracy") is not None else "")
        row += [f"{m['parameters']:,}", f"{m['active_parameters']:,}", f"{m['parameter_bytes'] / 2**20:.2f}",
                f"{m['decode_tokens_per_second']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    settings = results.get("settings")
    if settings:
        lines += ["", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items())]
    return "\n".join(lines) + "\n"


def plot_report(results: dict[str, Any], path: str | Path) -> Path:
    """Bar plots: perplexity, digits accuracy (when measured), parameter memory and decode speed per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = results["models"]
    names = list(models)
    panels = [("perplexity", "held-out perplexity", 1.0)]
    if any(m.get("digits_accuracy") is not None for m in models.values()):
        panels.append(("digits_accuracy", "digits accuracy", 1.0))
    panels += [
        ("parameter_bytes", "parameter memory (MB)", 2.0**-20),
        ("decode_tokens_per_second", "decode tokens/s", 1.0),
    ]
    fig = Figure(figsize=(3.2 * len(panels), 3.4))
    FigureCanvasAgg(fig)
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    for i, (key, title, scale) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        values = [(models[n].get(key) or 0.0) * scale for n in names]
        bars = ax.bar(names, values, color=colors[: len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle("teacher vs distilled vs labels-only student", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def distillation_report(
    models: dict[str, torch.nn.Module],
    eval_batches: list[dict[str, torch.Tensor]],
    out_dir: str | Path,
    prompt_ids: torch.Tensor,
    processor=None,
    digits_records: list[dict[str, Any]] | None = None,
    decode_tokens: int = 32,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure each model of `models` (e.g. `{"teacher": ..., "distilled": ..., "labels_only": ...}`) and write
    `distillation_report.md`, `.json` and `.png` to `out_dir`; returns the JSON content.

    `eval_batches`: held-out batches for the perplexity; `digits_records` (with the `processor`): held-out digits
    questions for the accuracy of multimodal models (skipped for text-only ones); `prompt_ids`: the decode prompt;
    `extra`: more top-level JSON fields (settings, training logs, ...).
    """
    measured = {}
    for name, model in models.items():
        entry = {"perplexity": perplexity(model, eval_batches), **parameter_summary(model)}
        multimodal = hasattr(getattr(model, "model", None), "vision_model")
        entry["digits_accuracy"] = (
            answer_accuracy(model, processor, digits_records) if digits_records and multimodal else None
        )
        entry["decode_tokens_per_second"] = decode_tokens_per_second(model, prompt_ids, decode_tokens)
        measured[name] = entry
    results = {**(extra or {}), "models": measured}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{REPORT_NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{REPORT_NAME}.md").write_text(_markdown(results))
    plot_report(results, out_dir / f"{REPORT_NAME}.png")
    return results
