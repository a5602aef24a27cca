"""End-to-end smoke run: tokenizer -> tiny llama4x -> a short pretraining run -> eval -> sample -> save.

This is the body of `llama4x demo` until the full demo lands. Everything runs on bundled data (Python's own
documentation, see `llama4x.data`) with no network. It prints user-facing progress (a tqdm bar and the loss every
`log_every` steps) because it is a job, not a library function; pass `verbose=False` to silence it.

Outputs written to `out_dir`:

- `config.json`, `model.safetensors`, `generation_config.json`: the trained model (`save_pretrained`);
- `tokenizer.json`, `tokenizer_config.json`: the trained tokenizer;
- `results.json`: the losses, the sample and the run settings;
- `loss_curve.png`: training loss per step, with the eval loss before and after.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import pack_token_ids, python_docs_texts, train_eval_split
from .tokenization import train_tokenizer

IGNORE_INDEX = -100


def make_lm_blocks(
    tokenizer: Any, texts: list[str], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize `texts` (BOS-prefixed), pack them EOS-separated into blocks; return `(input_ids, mask, labels)`.

    Labels equal the input ids with the padding of the final block set to -100; the model shifts them itself.
    """
    ids = tokenizer(texts)["input_ids"]
    blocks, masks = pack_token_ids(ids, block_size, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    input_ids = torch.tensor(blocks, dtype=torch.long)  # (N, T)
    attention_mask = torch.tensor(masks, dtype=torch.long)  # (N, T)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return input_ids, attention_mask, labels


@torch.no_grad()
def evaluate_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 8,
) -> float:
    """Token-weighted mean next-token cross-entropy of `model` on the given blocks.

    Computed from the logits rather than `outputs.loss`, so auxiliary terms the model adds to its training loss (MoE
    balancing / z-losses) do not leak into the reported held-out loss.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        logits = model(input_ids=input_ids[sl].to(device), attention_mask=attention_mask[sl].to(device)).logits
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V)
        shift_labels = labels[sl, 1:].to(device).reshape(-1)  # (B*(T-1),)
        total += F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def save_loss_curve(path: str | Path, losses: list[float], eval_before: float, eval_after: float) -> None:
    """Write a PNG of the training loss per step with the eval loss before/after as markers."""
    # Figure + Agg canvas directly: no pyplot, so the process-wide matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, label="train loss")
    ax.scatter([0, len(losses)], [eval_before, eval_after], color="tab:red", zorder=3, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("llama4x tiny: smoke run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_smoke(
    out_dir: str | Path,
    steps: int = 40,
    seed: int = 0,
    *,
    batch_size: int = 8,
    block_size: int = 128,
    lr: float = 3e-3,
    vocab_size: int = 2048,
    eval_blocks: int = 16,
    eval_fraction: float = 0.1,
    log_every: int = 5,
    max_new_tokens: int = 30,
    prompt: str = "def ",
    device: str | torch.device | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train a tokenizer and the tiny llama4x preset on Python's docs for `steps` AdamW steps, then save them.

    Args:
        out_dir: folder for the model, tokenizer, `results.json` and `loss_curve.png` (created if missing).
        steps: optimizer steps; each sees `batch_size` blocks of `block_size` tokens.
        seed: seeds the data split, the model initialisation and the batch order.
        batch_size, block_size: batch shape.
        lr: AdamW learning rate (constant; gradients clipped at norm 1).
        vocab_size: tokenizer vocabulary size (the model's `vocab_size` follows `len(tokenizer)`).
        eval_blocks: number of held-out blocks the eval loss is averaged over (fewer if the split is smaller).
        eval_fraction: share of the documents held out (`llama4x.data.train_eval_split`).
        log_every: print the training loss every this many steps.
        max_new_tokens, prompt: the greedy sample generated after training.
        device: where to train; default CUDA if available, else CPU.
        verbose: print progress and the summary.

    Returns:
        A dict with `initial_loss` (training loss of step 1, before any update), `final_loss` (mean training loss of
        the last `min(5, steps)` steps), `eval_loss_before`, `eval_loss_after`, `sample` (decoded text, prompt
        included), `train_losses` (one per step), `out_dir`, `seconds` and the run settings. The same dict is written
        to `out_dir/results.json`. Nothing is asserted: callers decide what counts as success.

    Raises:
        ValueError: for a non-positive `steps`, `batch_size`, `block_size`, `eval_blocks`, `log_every` or `lr`.
    """
    for name, value in [
        ("steps", steps),
        ("batch_size", batch_size),
        ("block_size", block_size),
        ("eval_blocks", eval_blocks),
        ("log_every", log_every),
    ]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be > 0")

    from transformers import set_seed

    from . import Llama4XForCausalLM, Llama4XTextConfig

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    say = print if verbose else (lambda *a, **k: None)

    # 1. Data and tokenizer: the tokenizer sees the training split only.
    train_texts, eval_texts = train_eval_split(python_docs_texts(), eval_fraction=eval_fraction, seed=seed)
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)
    train_ids, train_mask, train_labels = make_lm_blocks(tokenizer, train_texts, block_size)
    eval_ids, eval_mask, eval_labels = (t[:eval_blocks] for t in make_lm_blocks(tokenizer, eval_texts, block_size))
    say(
        f"data: {len(train_texts)} train / {len(eval_texts)} eval documents, {train_ids.shape[0]} train blocks and "
        f"{eval_ids.shape[0]} eval blocks of {block_size} tokens; tokenizer vocab {len(tokenizer)}"
    )

    # 2. Model: the tiny preset sized to the tokenizer.
    set_seed(seed)
    config = Llama4XTextConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Llama4XForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: llama4x tiny, {n_params / 1e6:.2f}M parameters, on {device}")

    # 3. Train.
    eval_before = evaluate_lm_loss(model, eval_ids, eval_mask, eval_labels, batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_ids.shape[0], generator=generator)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(1, steps + 1), desc="train", disable=not verbose)
    for step in bar:
        start = ((step - 1) * batch_size) % train_ids.shape[0]
        if start + batch_size > order.numel():  # new epoch: reshuffle rather than wrap a short batch
            order = torch.randperm(train_ids.shape[0], generator=generator)
            start = 0
        idx = order[start : start + batch_size]
        outputs = model(
            input_ids=train_ids[idx].to(device),
            attention_mask=train_mask[idx].to(device),
            labels=train_labels[idx].to(device),
        )
        loss = outputs.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}; try a lower lr (lr={lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if verbose and (step % log_every == 0 or step == steps):
            bar.write(f"step {step:4d}/{steps}  loss {losses[-1]:.4f}")
    bar.close()
    eval_after = evaluate_lm_loss(model, eval_ids, eval_mask, eval_labels, batch_size)

    # 4. Sample greedily from the trained model.
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)

    # 5. Save everything.
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-min(5, steps) :]
    results = {
        "initial_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "sample": sample,
        "train_losses": losses,
        "out_dir": str(out_dir),
        "seconds": round(time.perf_counter() - t0, 2),
        "settings": {
            "steps": steps,
            "seed": seed,
            "batch_size": batch_size,
            "block_size": block_size,
            "lr": lr,
            "eval_fraction": eval_fraction,
            "eval_blocks": eval_ids.shape[0],
            "vocab_size": len(tokenizer),
            "n_params": n_params,
            "device": str(device),
            "uniform_loss": math.log(len(tokenizer)),
        },
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    save_loss_curve(out_dir / "loss_curve.png", losses, eval_before, eval_after)

    say(f"train loss {results['initial_loss']:.3f} -> {results['final_loss']:.3f} (mean of last {len(tail)} steps)")
    say(f"eval loss  {eval_before:.3f} -> {eval_after:.3f}  (uniform: {math.log(len(tokenizer)):.3f})")
    say(f"sample: {sample!r}")
    say(f"saved model, tokenizer, results.json and loss_curve.png to {out_dir}")
    return results
