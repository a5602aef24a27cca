"""Load-balancing benchmark: the tiny MoE preset trained under one budget with four balancing strategies.

Every variant gets the same tokenizer, the same initial weights, the same batches in the same order and the same
AdamW schedule; only the balancing fields of the config differ:

    no_balancing         neither
    aux_loss             router_aux_loss_coef = aux_loss_coef      (Switch/GShard loss added to the LM loss)
    loss_free            router_bias_update_rate = bias_update_rate (DeepSeek-V3's bias, arXiv 2408.15664)
    aux_loss+loss_free   both

Metrics (`llama4x.balancing`):

- max violation `max_i load_i / mean_load - 1` per MoE layer, averaged over the layers: 0 is perfect balance, and
  with 16 experts top-1, 15 means every token of a layer goes to one expert;
- load entropy of the tokens-per-expert distribution divided by `log(E)`, averaged over the layers (1 is uniform);
- LM loss: next-token cross-entropy only, the auxiliary loss is never included.

During training they are measured on every batch and averaged over windows of `log_every` steps. At the end they are
measured on the held-out blocks with the model in eval mode, the expert loads summed over the whole held-out set.

Outputs in `out_dir`: `results.json`, `results.md` (a markdown table), `max_violation.png`, `lm_loss.png` and
`expert_load_heatmap.png` (held-out load per layer and expert, one panel per variant).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..balancing import load_entropy, max_violation
from ..data import block_batches, make_lm_blocks, python_docs_split
from ..evaluation import evaluating, next_token_loss_sum
from ..tokenization import train_tokenizer

# 8.5 epochs of the bundled data: the held-out loss is still falling, balance has settled, and the four variants
# take about 7-10 minutes on 2 CPU cores (BENCHMARKS.md, "Balancing").
DEFAULT_STEPS = 1000
QUICK_STEPS = 8
QUICK_EVAL_BLOCKS = 4

# name -> (aux loss on, loss-free bias on)
VARIANTS: dict[str, tuple[bool, bool]] = {
    "no_balancing": (False, False),
    "aux_loss": (True, False),
    "loss_free": (False, True),
    "aux_loss+loss_free": (True, True),
}


def variant_overrides(name: str, aux_loss_coef: float, bias_update_rate: float) -> dict[str, float]:
    """The balancing fields of the text config for variant `name`."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown variant {name!r}: expected one of {list(VARIANTS)}.")
    aux_on, bias_on = VARIANTS[name]
    return {
        "router_aux_loss_coef": aux_loss_coef if aux_on else 0.0,
        "router_bias_update_rate": bias_update_rate if bias_on else 0.0,
    }


def batch_schedule(num_blocks: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """`(steps, batch_size)` block indices: epochs of a seeded permutation, each cut into full batches (the
    remainder of an epoch is dropped, so every batch has `batch_size` distinct blocks)."""
    if num_blocks < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {num_blocks} training blocks")
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_blocks // batch_size
    epochs = math.ceil(steps / per_epoch)
    batches = [torch.randperm(num_blocks, generator=generator)[: per_epoch * batch_size] for _ in range(epochs)]
    return torch.cat(batches).view(-1, batch_size)[:steps]


def lm_part_of_loss(outputs: Any, config: Any) -> torch.Tensor:
    """The cross-entropy part of a training loss: `outputs.loss` minus the weighted balancing losses the model
    added to it (`Llama4XCausalLMOutput.loss` documents the sum)."""
    loss = outputs.loss
    if config.router_aux_loss_coef > 0:
        loss = loss - config.router_aux_loss_coef * outputs.aux_loss
    if config.router_z_loss_coef > 0:
        loss = loss - config.router_z_loss_coef * outputs.z_loss
    return loss


def evaluate_balance(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Held-out LM loss (cross-entropy only) and routing statistics of the loads summed over all the blocks.

    Runs in eval mode (no bias updates, no jitter) with `output_router_logits=True`; restores the training mode.
    """
    total, count, load_LE = 0.0, 0, None
    with evaluating(model) as device:
        for batch in block_batches((input_ids, attention_mask, labels), batch_size):
            outputs = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                output_router_logits=True,
            )
            batch_total, batch_count = next_token_loss_sum(outputs.logits, batch["labels"])
            total, count = total + batch_total, count + batch_count
            load = outputs.expert_load.cpu()  # (L, E)
            load_LE = load if load_LE is None else load_LE + load
    violation_L, entropy_L = max_violation(load_LE), load_entropy(load_LE)
    return {
        "lm_loss": total / max(count, 1),
        "max_violation": violation_L.mean().item(),
        "load_entropy": entropy_L.mean().item(),
        "max_violation_per_layer": violation_L.tolist(),
        "load_entropy_per_layer": entropy_L.tolist(),
        "expert_load": load_LE.tolist(),
        "tokens": count,
    }


def train_variant(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    schedule: torch.Tensor,
    *,
    lr: float,
    warmup_steps: int,
    log_every: int,
    desc: str = "train",
    verbose: bool = True,
) -> tuple[list[dict[str, float]], float]:
    """AdamW on the batches of `schedule` (linear warmup, then constant lr; gradients clipped at norm 1).

    Returns `(history, train_seconds)`: one history entry every `log_every` steps (and at the last step) with the
    window means of the per-batch LM loss, max violation and load entropy (each averaged over the MoE layers).
    Loss-free bias updates need nothing here: the model applies them after each `optimizer.step()`.
    """
    train_ids, train_mask, train_labels = train
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(warmup_steps, 1)))
    steps = schedule.shape[0]
    history: list[dict[str, float]] = []
    window: dict[str, list[float]] = {"lm_loss": [], "max_violation": [], "load_entropy": []}
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not verbose)
    for step in bar:
        idx = schedule[step - 1]
        outputs = model(
            input_ids=train_ids[idx].to(device),
            attention_mask=train_mask[idx].to(device),
            labels=train_labels[idx].to(device),
            output_router_logits=True,
        )
        if not torch.isfinite(outputs.loss):
            raise FloatingPointError(f"training loss is {outputs.loss.item()} at step {step}; try a lower lr ({lr})")
        optimizer.zero_grad(set_to_none=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        current_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()

        load_LE = outputs.expert_load.detach().cpu()  # (L, E), this batch's tokens only
        window["lm_loss"].append(lm_part_of_loss(outputs, model.config).item())
        window["max_violation"].append(max_violation(load_LE).mean().item())
        window["load_entropy"].append(load_entropy(load_LE).mean().item())
        if step % log_every == 0 or step == steps:
            entry = {"step": step, "lr": current_lr}
            entry.update({key: sum(values) / len(values) for key, values in window.items()})
            history.append(entry)
            window = {key: [] for key in window}
            bar.set_postfix(lm_loss=f"{entry['lm_loss']:.3f}", max_vio=f"{entry['max_violation']:.2f}")
    bar.close()
    return history, time.perf_counter() - t0


def run_balance_benchmark(
    out_dir: str | Path = "benchmarks/balance",
    steps: int | None = None,
    seed: int = 0,
    *,
    quick: bool = False,
    variants: Sequence[str] | None = None,
    aux_loss_coef: float = 0.01,
    bias_update_rate: float = 0.001,
    batch_size: int = 8,
    block_size: int = 128,
    lr: float = 3e-3,
    warmup_steps: int = 50,
    vocab_size: int = 2048,
    eval_fraction: float = 0.1,
    eval_blocks: int | None = None,
    log_every: int | None = None,
    device: str | torch.device | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train the tiny preset once per balancing variant under the same budget; write results and plots.

    Args:
        out_dir: folder for `results.json`, `results.md` and the PNG plots (created if missing).
        steps: optimizer steps per variant, each on `batch_size` blocks of `block_size` tokens. Default
            `DEFAULT_STEPS`, or `QUICK_STEPS` with `quick`.
        seed: seeds the initial weights (shared by all variants) and the batch order (the docs' split is fixed,
            `llama4x.data.python_docs_split`).
        quick: a smoke-sized run: `QUICK_STEPS` steps and `QUICK_EVAL_BLOCKS` held-out blocks unless given.
        variants: names from `VARIANTS` to run (default: all four, in that order).
        aux_loss_coef: `router_aux_loss_coef` of the aux-loss variants.
        bias_update_rate: `router_bias_update_rate` of the loss-free variants.
        batch_size, block_size: batch shape.
        lr, warmup_steps: AdamW learning rate, reached linearly over `warmup_steps`, then constant.
        vocab_size: tokenizer vocabulary size (the model's `vocab_size` follows `len(tokenizer)`).
        eval_fraction: share of the documents held out (`llama4x.data.python_docs_split`).
        eval_blocks: held-out blocks to evaluate on (default: all; `QUICK_EVAL_BLOCKS` with `quick`).
        log_every: window, in steps, of the training curves (default: about 100 points per curve).
        device: where to train; default CUDA if available, else CPU.
        verbose: progress bars and a summary table on stdout.

    Returns:
        The dict written to `out_dir/results.json`: `variants` (per name: `label`, the balancing `overrides`,
        `history`, `eval` from `evaluate_balance`, `final_train_lm_loss`, `train_seconds`, `seconds_per_step` and
        `e_score_correction_bias` per MoE layer, None without loss-free balancing), `initial_eval` (the shared
        initial model), `settings` and `seconds`.

    Raises:
        ValueError: for a non-positive size, step count or rate, or an unknown variant name.
    """
    steps = steps if steps is not None else (QUICK_STEPS if quick else DEFAULT_STEPS)
    eval_blocks = eval_blocks if eval_blocks is not None else (QUICK_EVAL_BLOCKS if quick else None)
    log_every = log_every if log_every is not None else max(1, steps // 100)
    variants = list(variants) if variants is not None else list(VARIANTS)
    for name, value in [("steps", steps), ("batch_size", batch_size), ("block_size", block_size),
                        ("log_every", log_every)]:  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be an int >= 0")
    if eval_blocks is not None and (not isinstance(eval_blocks, int) or eval_blocks < 1):
        raise ValueError(f"eval_blocks={eval_blocks!r} must be an int >= 1 or None (all held-out blocks)")
    for name, value in [("lr", lr), ("aux_loss_coef", aux_loss_coef), ("bias_update_rate", bias_update_rate)]:
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0")
    if not variants:
        raise ValueError("variants is empty: expected names from " + str(list(VARIANTS)))
    for name in variants:
        variant_overrides(name, aux_loss_coef, bias_update_rate)  # validates the name

    from transformers import set_seed

    from .. import Llama4XForCausalLM, Llama4XTextConfig

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    say = print if verbose else (lambda *a, **k: None)

    # 1. Data: the tokenizer sees the training documents only; held-out documents are packed separately.
    train_texts, eval_texts = python_docs_split(eval_fraction)
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)
    train = make_lm_blocks(tokenizer, train_texts, block_size)
    held_out = tuple(t[:eval_blocks] for t in make_lm_blocks(tokenizer, eval_texts, block_size))
    schedule = batch_schedule(train[0].shape[0], batch_size, steps, seed)
    epochs = steps * batch_size / train[0].shape[0]
    say(
        f"data: {train[0].shape[0]} train / {held_out[0].shape[0]} held-out blocks of {block_size} tokens, "
        f"vocab {len(tokenizer)}; {steps} steps x {batch_size} blocks = {epochs:.1f} epochs per variant"
    )

    # 2. One initial model; every variant starts from its weights (the bias buffers start at zero).
    set_seed(seed)
    base_fields = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    initial = Llama4XForCausalLM(Llama4XTextConfig.from_preset("tiny", **base_fields)).to(device)
    initial_state = {k: v.detach().clone() for k, v in initial.state_dict().items()}
    n_params = sum(p.numel() for p in initial.parameters())
    initial_eval = evaluate_balance(initial, *held_out, batch_size=batch_size)
    del initial

    # 3. Train and evaluate each variant.
    results: dict[str, Any] = {}
    for i, name in enumerate(variants):
        overrides = variant_overrides(name, aux_loss_coef, bias_update_rate)
        config = Llama4XTextConfig.from_preset("tiny", **base_fields, **overrides)
        model = Llama4XForCausalLM(config)
        missing, unexpected = model.load_state_dict(initial_state, strict=False)
        assert not unexpected and all(k.endswith("e_score_correction_bias") for k in missing), (missing, unexpected)
        model.to(device)
        set_seed(seed)
        history, train_seconds = train_variant(
            model, train, schedule, lr=lr, warmup_steps=warmup_steps, log_every=log_every,
            desc=f"({chr(ord('a') + i)}) {name}", verbose=verbose,
        )  # fmt: skip
        biases = [block.e_score_correction_bias for block in model.model.moe_blocks]
        results[name] = {
            "label": _label(name, overrides),
            "overrides": overrides,
            "history": history,
            "eval": evaluate_balance(model, *held_out, batch_size=batch_size),
            "final_train_lm_loss": history[-1]["lm_loss"],
            "train_seconds": round(train_seconds, 2),
            "seconds_per_step": round(train_seconds / steps, 4),
            "e_score_correction_bias": None if biases[0] is None else [b.tolist() for b in biases],
        }
        del model

    summary = {
        "variants": results,
        "initial_eval": initial_eval,
        "settings": {
            "steps": steps,
            "seed": seed,
            "batch_size": batch_size,
            "block_size": block_size,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "aux_loss_coef": aux_loss_coef,
            "bias_update_rate": bias_update_rate,
            "vocab_size": len(tokenizer),
            "eval_fraction": eval_fraction,
            "train_blocks": train[0].shape[0],
            "eval_blocks": held_out[0].shape[0],
            "epochs": round(epochs, 2),
            "log_every": log_every,
            "n_params": n_params,
            "preset": "tiny",
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = results_table(summary)
    (out_dir / "results.md").write_text(table)
    write_plots(out_dir, summary)
    say(table)
    say(f"wrote results.json, results.md and 3 plots to {out_dir} in {summary['seconds']:.0f} s")
    return summary


def _label(name: str, overrides: dict[str, float]) -> str:
    parts = []
    if overrides["router_aux_loss_coef"] > 0:
        parts.append(f"aux loss {overrides['router_aux_loss_coef']:g}")
    if overrides["router_bias_update_rate"] > 0:
        parts.append(f"loss-free bias {overrides['router_bias_update_rate']:g}")
    return " + ".join(parts) if parts else "no balancing"


def results_table(summary: dict[str, Any]) -> str:
    """The markdown table of `results.md`: held-out balance and loss, final train loss and time per variant."""
    s = summary["settings"]
    lines = [
        f"Balancing on the tiny preset: {s['steps']} steps x {s['batch_size']} x {s['block_size']} tokens, "
        f"seed {s['seed']}; held-out metrics on {s['eval_blocks']} blocks (eval mode, loads summed over the set).",
        "",
        "| variant | max violation (held-out) ↓ | load entropy (held-out) ↑ | LM loss (held-out) ↓ "
        "| LM loss (train, last window) | train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(summary["variants"].values()):
        e = r["eval"]
        lines.append(
            f"| ({chr(ord('a') + i)}) {r['label']} | {e['max_violation']:.3f} | {e['load_entropy']:.4f} "
            f"| {e['lm_loss']:.4f} | {r['final_train_lm_loss']:.4f} | {r['train_seconds']:.0f} |"
        )
    init = summary["initial_eval"]
    lines += [
        "",
        f"Initial model (shared by all variants): max violation {init['max_violation']:.3f}, "
        f"load entropy {init['load_entropy']:.4f}, LM loss {init['lm_loss']:.4f}.",
        "",
    ]
    return "\n".join(lines)


def write_plots(out_dir: str | Path, summary: dict[str, Any]) -> None:
    """`max_violation.png`, `lm_loss.png` and `expert_load_heatmap.png` from a results dict (or a loaded
    `results.json`), so plots can be redrawn without training again."""
    out_dir, results = Path(out_dir), summary["variants"]
    plot_curves(out_dir / "max_violation.png", results, "max_violation", "max violation (batch, mean over layers)")
    plot_curves(out_dir / "lm_loss.png", results, "lm_loss", "LM loss (train, nats/token)")
    plot_load_heatmaps(out_dir / "expert_load_heatmap.png", results)


def _figure(figsize: tuple[float, float]):
    # Figure + Agg canvas directly: no pyplot, so the process-wide matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_curves(path: str | Path, results: dict[str, Any], key: str, ylabel: str) -> None:
    """One line per variant of the history entry `key` against the step."""
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    for r in results.values():
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h[key] for h in r["history"]], label=r["label"])
    if key == "max_violation":
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"llama4x tiny: {ylabel.split(' (')[0]} per training window")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(path, dpi=110)


def plot_load_heatmaps(path: str | Path, results: dict[str, Any]) -> None:
    """Held-out load of each expert relative to its layer's mean, layers x experts, one panel per variant.

    The colour scale is logarithmic and centred on 1 (white = balanced, red = overloaded, blue = starved), so the
    well-balanced variants are not washed out by an unbalanced one; empty experts are drawn at the lower bound.
    """
    from matplotlib.colors import LogNorm

    relative = {}
    for name, r in results.items():
        load_LE = torch.tensor(r["eval"]["expert_load"], dtype=torch.float64)
        relative[name] = load_LE / load_LE.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    bound = max(2.0, *(float(rel.max()) for rel in relative.values()))
    norm = LogNorm(vmin=1 / bound, vmax=bound)
    cols = min(len(results), 2)
    rows = math.ceil(len(results) / cols)
    fig = _figure((6 * cols, 2.2 * rows + 0.8))
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    image = None
    for ax, (name, r) in zip(axes, results.items()):
        rel_LE = relative[name].clamp(min=1 / bound)
        image = ax.imshow(rel_LE.numpy(), aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set_title(f"{r['label']}: max violation {r['eval']['max_violation']:.2f}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(rel_LE.shape[1]))
        ax.set_yticks(range(rel_LE.shape[0]))
        ax.tick_params(labelsize=7)
    for ax in axes[len(results) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(results)]), label="load / mean load (held-out, log scale)")
    fig.suptitle("llama4x tiny: held-out tokens per expert")
    fig.savefig(path, dpi=110)
