"""`llama4x demo`: train, fine-tune and distill a tiny early-fusion MoE end to end on bundled data, on a CPU.

Everything runs offline on data that ships with installed packages: the help topics of Python's documentation
(`pydoc_data`, text) and scikit-learn's 1,797 handwritten digit scans (images, `llama4x.data.digits_vqa`).

Stages, each writing its outputs to the run folder and then a marker `stages/<stage>.json` (its results and time):

1. tokenizer  byte-level BPE on the training split of the docs plus the chat turns of the two digit questions;
              every llama4x special token is checked to be a single token.
2. teacher    a tiny early-fusion multimodal MoE (16 routed experts top-1 + a shared expert per layer, iRoPE with
              chunks shorter than the text blocks, loss-free balancing biases) pretrained from scratch; every step
              takes one batch of text blocks and one batch of digit questions ("What digit is this?" -> "7") and
              sums their losses: both data kinds train the one model jointly (early fusion).
3. evaluate   held-out text perplexity, digits accuracy (greedy generation, exact match), routing max-violation on
              held-out data (with the balancing bias and, for reference, with it removed), greedy samples.
4. lora       a new question, "Is this digit even or odd?" -> "even"/"odd", learned by LoRA alone (attention,
              shared and routed experts, router; `llama4x.lora_config`); accuracy before and after.
5. distill    the teacher distilled into dense students with `llama4x.distillation`: a `llama4x` student (vision
              kept) on 10% of the labelled digit scans and a vanilla `LlamaForCausalLM` student on the text, each
              against the same student trained on the labels only for the same steps; each pair is trained with
              `distill_seeds` seeds and compared by its means, as one seed's accuracy moves as much as they differ.
6. report     `report.md`, `report.json` and PNG plots (`llama4x.demo_report`).

A rerun into the same folder with the same settings skips the stages whose marker exists (and redoes every stage
after the first one it redoes: their markers are removed when it starts, so a later rerun redoes them too, even after
`--stop-after` or a kill); other settings in the same folder are refused. Folder layout:

    settings.json           the settings of the run (a resumed run must match them)
    stages/<stage>.json     marker and results of each finished stage
    tokenizer/              AutoTokenizer
    teacher/                AutoModelForImageTextToText + AutoProcessor
    lora_parity/            PEFT adapter of the teacher (PeftModel.from_pretrained(teacher, "lora_parity")) and the
                            processor
    students/llama4x/       dense llama4x student (AutoModelForImageTextToText + AutoProcessor); labels_only/ inside;
                            the pairs of the further seeds in seed_<n>/
    students/llama/         LlamaForCausalLM student (AutoModelForCausalLM + AutoTokenizer); the same layout
    plots/*.png, report.md, report.json
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging

from .balancing import max_violation
from .checkpoints import write_json_atomically
from .configuration_llama4x import FUSION_TYPES
from .data import (
    DIGITS_QUESTION,
    IGNORE_INDEX,
    PARITY_QUESTION,
    DigitsCollator,
    block_batches,
    digits_vqa,
    lm_rows,
    make_lm_blocks,
    parity_records,
    python_docs_split,
)
from .evaluation import answer_questions, exact_match, perplexity
from .tokenization import EOT_TOKEN, SPECIAL_TOKENS

logger = logging.get_logger(__name__)

STAGES = ("tokenizer", "teacher", "evaluate", "lora", "distill", "report")
STAGE_TITLES = {
    "tokenizer": "train the byte-level BPE tokenizer",
    "teacher": "pretrain the multimodal MoE teacher on text + digits",
    "evaluate": "evaluate the teacher",
    "lora": "LoRA fine-tune on a new question (even / odd)",
    "distill": "distill the teacher into dense students",
    "report": "write the report and plots",
}
TEXT_PROMPTS = ("The ", "def ", "A class ", "If the ")
# Share of `--minutes` for the teacher's training. The later training stages scale their steps by the same factor,
# which keeps their share of a default run (teacher 47 %, LoRA 3 %, distillation 48 % with its 3 seeds, in the run of
# BENCHMARKS.md); evaluation and saving take the rest.
TEACHER_TIME_SHARE = 0.45


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo. `DemoSettings.create(quick=...)` gives the default or the `--quick` run.

    Steps are fixed, so a run is reproducible; `minutes` instead fits the step counts of every training stage to a
    wall-clock budget measured on this machine (more or fewer steps than the defaults; see `measure_step_scale`).
    """

    seed: int = 0
    quick: bool = False
    minutes: float | None = None
    fusion: str = "patch"
    # data
    vocab_size: int = 2048
    block_size: int = 128
    eval_fraction: float = 0.1
    image_size: int = 8  # the scans' own 8x8 resolution (16 with fusion="encoder", see `create`)
    eval_digits: int | None = None  # held-out digit questions evaluated (None: all 359)
    eval_text_blocks: int | None = None  # held-out text blocks evaluated (None: all)
    # teacher
    hidden_size: int = 128
    num_layers: int = 4
    attention_chunk_size: int = 32
    num_experts: int = 16
    moe_intermediate_size: int = 128
    bias_update_rate: float = 1e-3
    teacher_steps: int = 800
    text_batch_size: int = 8
    digits_batch_size: int = 32
    teacher_lr: float = 3e-3
    augment_shift: int = 0  # teacher's digit scans moved by up to this many pixels (0: no augmentation)
    # LoRA
    lora_steps: int = 100
    lora_lr: float = 3e-3
    lora_r: int = 8
    # distillation
    distill_steps: int = 120
    distill_lr: float = 2e-3
    distill_alpha: float = 0.5
    # The digits students learn from this share of the training scans (a random subset per seed), as a student
    # distilled on a small transfer set: with all 1,438 scans the student, which starts from the teacher's weights,
    # reads digits as well as the teacher from the labels alone, and distillation has nothing to add (94.0% vs 94.2%,
    # means of 3 seeds; BENCHMARKS.md).
    distill_digits_fraction: float = 0.1
    # The teacher is nearly one-hot on its training digits; T = 4 exposes the rest of its distribution (at T = 1 and 2
    # the distilled llama4x student read digits worse than the labels-only one; at 4 it won on digits and on text).
    distill_temperature: float = 4.0
    # Each student pair is trained with seeds seed, seed + 1, ... (the order of its data, and the digits students'
    # labelled subset) and compared by the means.
    # With one seed the llama4x students' digits accuracies moved by 1-3 points from seed to seed (359 scans; one
    # point is 3.6 scans), as much as distillation gained.
    distill_seeds: int = 3
    log_every: int = 10
    # The tiny model's matrices are too small to gain from intra-op threads: on 2 cores one thread ran a teacher
    # step in 0.23 s, two threads in 0.6 s (and far worse when other processes share the cores).
    threads: int = 1

    def __post_init__(self):
        if self.fusion not in FUSION_TYPES:
            raise ValueError(f"Invalid `fusion`={self.fusion!r}: expected one of {FUSION_TYPES}.")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"Invalid `minutes`={self.minutes!r}: expected a positive number of minutes or None.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("seed", "quick", "minutes", "fusion", "augment_shift") or value is None:
                continue
            if not value > 0:
                raise ValueError(f"Invalid `{f.name}`={value!r}: expected a positive number.")
        from .cli import MAX_SEED

        if not 0 <= self.seed <= MAX_SEED - (self.distill_seeds - 1):  # the students use seed .. seed + n - 1
            raise ValueError(
                f"Invalid `seed`={self.seed!r}: with distill_seeds={self.distill_seeds} the seeds up to "
                f"{self.seed + self.distill_seeds - 1} must be in 0..{MAX_SEED}."
            )
        if not self.distill_digits_fraction <= 1:
            raise ValueError(
                f"Invalid `distill_digits_fraction`={self.distill_digits_fraction!r}: expected a share in (0, 1]."
            )
        if self.augment_shift < 0:
            raise ValueError(f"Invalid `augment_shift`={self.augment_shift!r}: expected a number of pixels >= 0.")
        if self.attention_chunk_size >= self.block_size:
            raise ValueError(
                f"Invalid `attention_chunk_size`={self.attention_chunk_size}: the demo shows iRoPE's local chunks, "
                f"so it must be smaller than block_size={self.block_size}."
            )

    @classmethod
    def create(
        cls, quick: bool = False, seed: int = 0, minutes: float | None = None, fusion: str = "patch", **overrides
    ) -> DemoSettings:
        """The default run, or with `quick` the smoke-sized one (about 1 minute on 2 cores, lower targets)."""
        fields = {"seed": seed, "quick": quick, "minutes": minutes, "fusion": fusion}
        if fusion == "encoder":
            # The ViT overfits the 1,438 scans more than the patch projection does: with 16-pixel (upsampled) scans
            # shifted by up to a pixel it reached 95.5% held-out (8-pixel scans: 88.6%; 16 pixels unshifted: 90.3%).
            fields.update(image_size=16, augment_shift=1)
        if quick:
            fields.update(
                teacher_steps=120, lora_steps=40, distill_steps=20, distill_seeds=1, eval_digits=96,
                eval_text_blocks=16, log_every=5,
            )  # fmt: skip
            if fusion == "encoder":  # the ViT learns slower: digits 16.7% after 120 quick steps, 90.6% after 240
                fields.update(teacher_steps=240)
        return cls(**{**fields, **overrides})

    @property
    def targets(self) -> dict[str, float]:
        """What the report checks: teacher digits accuracy and LoRA parity accuracy at least these."""
        if self.quick:
            return {"teacher_digits_accuracy": 0.5, "lora_parity_accuracy": 0.6}
        return {"teacher_digits_accuracy": 0.9, "lora_parity_accuracy": 0.9}


class DemoStageError(RuntimeError):
    """A stage failed; the stages before it are kept in the run folder, so rerunning resumes at this one."""


# ---- data ----------------------------------------------------------------------------------------------------------


def shifted(record: dict[str, Any], rng: random.Random, pixels: int) -> dict[str, Any]:
    """The record with its scan moved by up to `pixels` in x and y (white fill): a training-time augmentation."""
    from PIL import Image

    dx, dy = rng.randint(-pixels, pixels), rng.randint(-pixels, pixels)
    if dx == dy == 0:
        return record
    image = record["image"]
    moved = image.transform(image.size, Image.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=(255, 255, 255))
    return {**record, "image": moved}


def chat_turns_for_tokenizer(repeats: int = 16) -> list[str]:
    """The chat turns of the digit questions, so that their words become tokens (shorter digit sequences)."""
    turns = []
    for question, answers in ((DIGITS_QUESTION, [str(d) for d in range(10)]), (PARITY_QUESTION, ["even", "odd"])):
        for answer in answers:
            turns.append(
                f"<|header_start|>user<|header_end|>\n\n{question}<|eot|>"
                f"<|header_start|>assistant<|header_end|>\n\n{answer}<|eot|>"
            )
    return turns * repeats


class DemoData:
    """The demo's data, built on first use: text documents and blocks, digit records, their batches."""

    def __init__(self, settings: DemoSettings):
        self.settings = settings
        self.train_texts, self.eval_texts = python_docs_split(settings.eval_fraction)
        self._digits: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None

    @property
    def digits(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """`(train, test)` digit records at the demo's image size; test cut to `eval_digits`."""
        if self._digits is None:
            train, test = digits_vqa(image_size=self.settings.image_size)
            self._digits = train, test[: self.settings.eval_digits]
        return self._digits

    def text_blocks(self, tokenizer, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask, labels)` blocks of the train or eval documents (eval cut to
        `eval_text_blocks`)."""
        texts = self.train_texts if split == "train" else self.eval_texts
        blocks = make_lm_blocks(tokenizer, texts, self.settings.block_size)
        if split == "eval":
            blocks = tuple(t[: self.settings.eval_text_blocks] for t in blocks)
        return blocks


def epochs_of_batches(num_items: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of item indices: seeded permutations, each cut into full batches."""
    if num_items < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {num_items} training items")
    rng = random.Random(seed)
    while True:
        order = list(range(num_items))
        rng.shuffle(order)
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


# ---- model construction --------------------------------------------------------------------------------------------


def vision_overrides(settings: DemoSettings) -> dict[str, Any]:
    """The vision front-end: 4 image tokens per scan with either fusion.

    "patch": a 2x2 grid of patches projected straight into the decoder (Fuyu); "encoder": a 2-layer ViT on a 4x4
    grid of patches whose pixel shuffle (0.5) merges them into 2x2 tokens (Llama 4's tower, tiny).
    """
    common = {"fusion": settings.fusion, "image_size": settings.image_size}
    if settings.fusion == "patch":
        return {**common, "patch_size": settings.image_size // 2}
    return {
        **common,
        "patch_size": settings.image_size // 4,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 128,
        "projector_output_dim": 128,
        "vision_output_dim": 128,
    }


def make_processor(tokenizer, settings: DemoSettings):
    """A `Llama4XProcessor` whose image-token layout matches `vision_overrides(settings)`: one tile per scan."""
    from .processing_llama4x import Llama4XImageProcessor, Llama4XProcessor

    vision = vision_overrides(settings)
    return Llama4XProcessor(
        Llama4XImageProcessor(size=settings.image_size, max_patches=1),
        tokenizer,
        patch_size=vision["patch_size"],
        pixel_shuffle_ratio=vision.get("pixel_shuffle_ratio", 1.0) if settings.fusion == "encoder" else 1.0,
    )


def teacher_config(tokenizer, settings: DemoSettings):
    """The tiny preset's MoE decoder (16 experts top-1 + shared, iRoPE, loss-free balancing) sized to the tokenizer,
    with the demo's vision front-end and the tokenizer's image token ids."""
    from .configuration_llama4x import Llama4XConfig, Llama4XTextConfig, Llama4XVisionConfig

    s = settings
    text = Llama4XTextConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        head_dim=s.hidden_size // 4,
        num_hidden_layers=s.num_layers,
        intermediate_size=2 * s.hidden_size,
        moe_intermediate_size=s.moe_intermediate_size,
        num_local_experts=s.num_experts,
        num_experts_per_tok=1,
        num_shared_experts=1,
        attention_chunk_size=s.attention_chunk_size,
        router_bias_update_rate=s.bias_update_rate,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT_TOKEN)],
    )
    ids = tokenizer.convert_tokens_to_ids(["<|patch|>", "<|image_start|>", "<|image_end|>"])
    return Llama4XConfig(
        text_config=text,
        vision_config=Llama4XVisionConfig.from_preset("tiny", **vision_overrides(s)),
        image_token_index=ids[0],
        boi_token_index=ids[1],
        eoi_token_index=ids[2],
    )


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and the parameters one token uses (the routed experts it is not sent to left out)."""
    from .distillation_report import parameter_summary

    summary = parameter_summary(model)
    return {"parameters": summary["parameters"], "active_parameters": summary["active_parameters"]}


# ---- training ------------------------------------------------------------------------------------------------------


def lr_factor(progress: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Linear warmup over the first `warmup` of training, then cosine decay to `floor` of the peak."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    decay = (progress - warmup) / (1.0 - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(decay, 1.0)))


def train_steps(
    model: torch.nn.Module,
    next_batches: Callable[[], dict[str, dict[str, torch.Tensor]]],
    steps: int,
    lr: float,
    desc: str,
    log_every: int,
    verbose: bool = True,
) -> list[dict[str, float]]:
    """AdamW for `steps` steps; each step sums the losses of the named batches `next_batches()` returns.

    Returns the log: every `log_every` steps the mean loss of each batch name over the window, the learning rate and,
    for MoE models, the routing max-violation of the training tokens of the window (mean over the MoE layers).
    """
    from .monitoring import find_text_model

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    text_model = find_text_model(model)
    if text_model is not None:
        text_model.pop_expert_load()  # start the routing window here
    model.train()
    history, window = [], {}
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not verbose, leave=False, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor((step - 1) / steps)
        total = 0.0
        for name, batch in next_batches().items():
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the {name} loss is {loss.item()} at step {step} (lr={lr})")
            loss.backward()
            window.setdefault(name, []).append(loss.item())
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()  # also applies the loss-free balancing bias update (see llama4x.balancing)
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{total:.3f}")
        if step % log_every == 0 or step == steps:
            entry = {"step": step, "lr": optimizer.param_groups[0]["lr"]}
            entry.update({f"{name}_loss": sum(v) / len(v) for name, v in window.items()})
            load_LE = text_model.pop_expert_load() if text_model is not None else None
            if load_LE is not None and load_LE.sum() > 0:
                entry["max_violation"] = max_violation(load_LE).mean().item()
            history.append(entry)
            window = {}
    bar.close()
    model.eval()
    return history


class TqdmCallback(TrainerCallback):
    """A progress bar over a `Trainer` run's optimizer steps (the demo's bars look the same in every stage)."""

    def __init__(self, desc: str, disable: bool = False):
        self.desc, self.disable, self.bar = desc, disable, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, disable=self.disable, leave=False, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


# ---- evaluation ----------------------------------------------------------------------------------------------------


def answer_perplexity(model: torch.nn.Module, processor, records: Sequence[dict[str, Any]]) -> float:
    """Perplexity of the answer tokens (answer and `<|eot|>`) given image and question: how sure the model is of the
    right answers, a finer measure than exact match."""
    collator = DigitsCollator(processor)
    return perplexity(model, (collator(records[i : i + 64]) for i in range(0, len(records), 64)))


@torch.no_grad()
def held_out_expert_load(
    model: torch.nn.Module, text_blocks: tuple[torch.Tensor, ...], digit_batches: Sequence[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Tokens per expert `(MoE layers, E)` over the held-out text blocks and digit sequences (padding excluded)."""
    model.eval()
    total = None
    for batch in block_batches(text_blocks) + list(digit_batches):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        load = model(**inputs, output_router_logits=True).expert_load.cpu()
        total = load if total is None else total + load
    return total


def routing_report(model, text_blocks, digit_batches) -> dict[str, Any]:
    """Routing max-violation on held-out data, as trained (balancing bias in the selection) and with the bias
    removed (the router's own preferences, same weights: what the bias corrects)."""
    from .monitoring import find_text_model

    blocks = find_text_model(model).moe_blocks
    with_bias = held_out_expert_load(model, text_blocks, digit_batches)
    saved = [b.e_score_correction_bias.clone() for b in blocks]
    try:
        for b in blocks:
            b.e_score_correction_bias.zero_()
        without_bias = held_out_expert_load(model, text_blocks, digit_batches)
    finally:
        for b, bias in zip(blocks, saved):
            b.e_score_correction_bias.copy_(bias)
    v_with, v_without = max_violation(with_bias), max_violation(without_bias)
    return {
        "max_violation": v_with.mean().item(),
        "max_violation_per_layer": v_with.tolist(),
        "max_violation_without_bias": v_without.mean().item(),
        "max_violation_without_bias_per_layer": v_without.tolist(),
        "expert_load": with_bias.tolist(),
        "tokens": int(with_bias[0].sum()),
    }


@torch.no_grad()
def text_samples(model, tokenizer, prompts: Sequence[str] = TEXT_PROMPTS, max_new_tokens: int = 24) -> list[dict]:
    """Greedy continuations of a few text prompts."""
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
        samples.append({"prompt": prompt, "text": tokenizer.decode(out[0], skip_special_tokens=True)})
    return samples


# ---- stages --------------------------------------------------------------------------------------------------------


class DemoRun:
    """One demo run: the folder, the settings, the results of the finished stages and the shared data."""

    def __init__(self, out_dir: Path, settings: DemoSettings, verbose: bool):
        self.out, self.settings, self.verbose = out_dir, settings, verbose
        self.results: dict[str, dict[str, Any]] = {}
        self._data: DemoData | None = None

    @property
    def data(self) -> DemoData:
        if self._data is None:
            self._data = DemoData(self.settings)
        return self._data

    def steps(self, default: int) -> int:
        """The step count of a later training stage, scaled to `--minutes` by the teacher stage's measurement."""
        scale = self.results.get("teacher", {}).get("step_scale", 1.0)
        return max(5, round(default * scale))

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.out / "tokenizer")

    def teacher(self):
        """The saved teacher and its processor, through the Auto classes."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = self.out / "teacher"
        return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def stage_tokenizer(run: DemoRun) -> dict[str, Any]:
    from .tokenization import special_token_ids, train_tokenizer

    s = run.settings
    texts = run.data.train_texts + chat_turns_for_tokenizer()
    tokenizer = train_tokenizer(texts, vocab_size=s.vocab_size)
    ids = special_token_ids(tokenizer, SPECIAL_TOKENS)  # raises if one is missing or split
    tokenizer.save_pretrained(run.out / "tokenizer")
    sample = run.data.eval_texts[0][:200]
    return {
        "vocab_size": len(tokenizer),
        "special_tokens": ids,
        "train_documents": len(run.data.train_texts),
        "eval_documents": len(run.data.eval_texts),
        "train_tokens": sum(len(t) for t in tokenizer(run.data.train_texts)["input_ids"]),
        "eval_tokens": sum(len(t) for t in tokenizer(run.data.eval_texts)["input_ids"]),
        "eval_chars_per_token": len(sample) / len(tokenizer(sample, add_special_tokens=False)["input_ids"]),
        "round_trip": tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"]) == sample,
    }


def _mixed_batches(run: DemoRun, processor, text_blocks) -> Callable[[], dict[str, dict[str, torch.Tensor]]]:
    s = run.settings
    input_ids, attention_mask, labels = text_blocks
    digits_train, _ = run.data.digits
    collator = DigitsCollator(processor)
    text_order = epochs_of_batches(input_ids.shape[0], s.text_batch_size, s.seed)
    digit_order = epochs_of_batches(len(digits_train), s.digits_batch_size, s.seed + 1)
    rng = random.Random(s.seed + 2)

    def next_batches() -> dict[str, dict[str, torch.Tensor]]:
        t = torch.tensor(next(text_order))
        records = [digits_train[i] for i in next(digit_order)]
        if s.augment_shift:
            records = [shifted(record, rng, s.augment_shift) for record in records]
        return {
            "text": {"input_ids": input_ids[t], "attention_mask": attention_mask[t], "labels": labels[t]},
            "digits": collator(records),
        }

    return next_batches


def measure_step_scale(run: DemoRun, model, next_batches, steps: int, share: float) -> tuple[float, float]:
    """`(scale, seconds per step)`: the factor that fits `steps` training steps into `share` of `--minutes`, from
    the time of two forward/backward passes (no update; capped to [0.05, 5])."""
    model.train()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for batch in next_batches().values():
            model(**batch).loss.backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    per_step = 1.25 * min(times[1:])  # + the optimizer step and the logging
    budget = run.settings.minutes * 60.0 * share
    return min(5.0, max(0.05, budget / (per_step * steps))), per_step


def stage_teacher(run: DemoRun) -> dict[str, Any]:
    from transformers import set_seed

    from .modeling_multimodal import Llama4XForConditionalGeneration

    s = run.settings
    tokenizer = run.tokenizer()
    processor = make_processor(tokenizer, s)
    text_train = run.data.text_blocks(tokenizer, "train")
    config = teacher_config(tokenizer, s)
    scale, per_step = 1.0, None
    if s.minutes is not None:  # timed on a throwaway model and batches, so the run itself is as without it
        scale, per_step = measure_step_scale(
            run, Llama4XForConditionalGeneration(config), _mixed_batches(run, processor, text_train),
            s.teacher_steps, TEACHER_TIME_SHARE,
        )  # fmt: skip
    next_batches = _mixed_batches(run, processor, text_train)
    set_seed(s.seed)
    model = Llama4XForConditionalGeneration(config)
    steps = max(5, round(s.teacher_steps * scale))
    start = time.perf_counter()
    history = train_steps(model, next_batches, steps, s.teacher_lr, "teacher", s.log_every, run.verbose)
    seconds = time.perf_counter() - start
    model.save_pretrained(run.out / "teacher")
    processor.save_pretrained(run.out / "teacher")
    digits_train, _ = run.data.digits
    return {
        "steps": steps,
        "step_scale": scale,
        "measured_seconds_per_step": per_step,
        "train_seconds": seconds,
        "history": history,
        "epochs_text": steps * s.text_batch_size / text_train[0].shape[0],
        "epochs_digits": steps * s.digits_batch_size / len(digits_train),
        "text_train_blocks": text_train[0].shape[0],
        "digits_train_examples": len(digits_train),
        "image_tokens_per_scan": model.config.vision_config.tokens_per_tile,
        "config": {
            "fusion": s.fusion,
            "image_size": s.image_size,
            "augment_shift": s.augment_shift,
            "hidden_size": s.hidden_size,
            "layers": s.num_layers,
            "layer_types": model.config.text_config.layer_types,
            "attention_chunk_size": s.attention_chunk_size,
            "block_size": s.block_size,
            "routed_experts": s.num_experts,
            "experts_per_token": 1,
            "shared_experts": 1,
            "router_bias_update_rate": s.bias_update_rate,
        },
        **parameter_counts(model),
    }


def stage_evaluate(run: DemoRun) -> dict[str, Any]:
    s = run.settings
    teacher, processor = run.teacher()
    tokenizer = processor.tokenizer
    text_eval = run.data.text_blocks(tokenizer, "eval")
    _, digits_test = run.data.digits
    answers = answer_questions(teacher, processor, digits_test, verbose=run.verbose)
    collator = DigitsCollator(processor)
    digit_batches = [collator(digits_test[i : i + 64]) for i in range(0, len(digits_test), 64)]
    return {
        "text_perplexity": perplexity(teacher, block_batches(text_eval)),
        "text_eval_blocks": text_eval[0].shape[0],
        "text_eval_tokens": int((text_eval[2][:, 1:] != IGNORE_INDEX).sum()),
        "uniform_perplexity": float(len(tokenizer)),
        "digits_accuracy": exact_match(answers, digits_test),
        "digits_answer_perplexity": answer_perplexity(teacher, processor, digits_test),
        "digits_eval_examples": len(digits_test),
        "digits_answers": answers,
        "routing": routing_report(teacher, text_eval, digit_batches),
        "text_samples": text_samples(teacher, tokenizer),
        "targets": {"digits_accuracy": s.targets["teacher_digits_accuracy"]},
    }


def stage_lora(run: DemoRun) -> dict[str, Any]:
    from peft import get_peft_model
    from transformers import set_seed

    from .lora import lora_config, lora_targets

    s = run.settings
    teacher, processor = run.teacher()
    digits_train, digits_test = run.data.digits
    train, test = parity_records(digits_train), parity_records(digits_test)
    before = answer_questions(teacher, processor, test, verbose=run.verbose)
    set_seed(s.seed)
    parts = [part for part, found in lora_targets(teacher).items() if found]  # every part this model has
    # The LM head is trained in full too: "even" and "odd" were rare words in the text, and a frozen head caps their
    # logits (LoRA alone reached 92% in 200 steps with its loss stuck near 1.2 nats; with the head, 91% in 80).
    config = lora_config(teacher, parts=parts, r=s.lora_r, alpha=2 * s.lora_r, modules_to_save=["lm_head"])
    model = get_peft_model(teacher, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    collator = DigitsCollator(processor)
    order = epochs_of_batches(len(train), s.digits_batch_size, s.seed + 2)
    steps = run.steps(s.lora_steps)
    start = time.perf_counter()
    history = train_steps(
        model, lambda: {"parity": collator([train[i] for i in next(order)])}, steps, s.lora_lr, "lora", s.log_every,
        run.verbose,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    after = answer_questions(model, processor, test, verbose=run.verbose)
    model.save_pretrained(run.out / "lora_parity")
    processor.save_pretrained(run.out / "lora_parity")  # a self-contained folder, as `llama4x train --lora` writes
    return {
        "question": PARITY_QUESTION,
        "parts": parts,
        "trained_in_full": sorted(config.modules_to_save),
        "r": s.lora_r,
        "trainable_parameters": trainable,
        "base_parameters": sum(p.numel() for p in teacher.parameters() if not p.requires_grad),
        "steps": steps,
        "train_seconds": seconds,
        "history": history,
        "accuracy_before": exact_match(before, test),
        "accuracy_after": exact_match(after, test),
        "chance": 0.5,
        "answers_before": before[:12],
        "answers_after": after,
        "eval_examples": len(test),
        "target": s.targets["lora_parity_accuracy"],
    }


def student_folder(run: DemoRun, kind: str, seed: int) -> Path:
    """Where the `kind` student pair of `seed` is saved: the run's first seed in `students/<kind>/`, the others in
    `students/<kind>/seed_<seed>/` (each with the labels-only baseline in `labels_only/`)."""
    folder = run.out / "students" / kind
    return folder if seed == run.settings.seed else folder / f"seed_{seed}"


def _distill_student(run: DemoRun, teacher, processor, kind: str, seed: int) -> dict[str, Any]:
    """Distill `teacher` into a dense `kind` student and train the same initial student on labels only, both with
    `seed` (the order of the data, and the subset of labelled scans of a digits student); save them in
    `student_folder(run, kind, seed)`."""
    from transformers import LlamaForCausalLM, default_data_collator, set_seed

    from .distillation import DistillationArguments, DistillationTrainer, distillation_training_arguments
    from .distillation_students import init_student_from_teacher, student_config
    from .modeling_multimodal import Llama4XForConditionalGeneration

    s = run.settings
    folder = student_folder(run, kind, seed)
    tokenizer = processor.tokenizer
    if kind == "llama4x":  # multimodal: the digits, images included
        train = run.data.digits[0]
        rows = random.Random(seed).sample(train, max(1, round(len(train) * s.distill_digits_fraction)))
        collator, batch_size = DigitsCollator(processor), s.digits_batch_size
    else:  # text only
        rows = lm_rows(tokenizer, run.data.train_texts, s.block_size)
        collator, batch_size = default_data_collator, s.text_batch_size
    set_seed(seed)
    config = student_config(teacher.config, kind)
    student = Llama4XForConditionalGeneration(config) if kind == "llama4x" else LlamaForCausalLM(config)
    calibration = [collator(rows[i : i + batch_size]) for i in range(0, min(len(rows), 4 * batch_size), batch_size)]
    init = init_student_from_teacher(student, teacher, calibration)
    labels_only = copy.deepcopy(student)
    steps = run.steps(s.distill_steps)
    dargs = DistillationArguments(loss="forward_kl", alpha=s.distill_alpha, temperature=s.distill_temperature)
    logs, seconds = {}, {}
    for name, model, args in (
        ("distilled", student, dargs),
        ("labels_only", labels_only, dataclasses.replace(dargs, alpha=0.0)),
    ):
        training_args = distillation_training_arguments(
            folder / "runs" / name, steps, s.distill_lr, batch_size, seed,
            logging_steps=max(1, min(s.log_every, steps // 5)), use_cpu=True,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=model, teacher=teacher if args.alpha > 0 else None, distillation_args=args, args=training_args,
            train_dataset=rows, data_collator=collator,
            callbacks=[TqdmCallback(f"{kind} student ({name.replace('_', '-')}, seed {seed})",
                                    disable=not run.verbose)],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the bar shows the loss; the log stays in the results
        start = time.perf_counter()
        trainer.train()
        seconds[name] = time.perf_counter() - start
        logs[name] = [e for e in trainer.state.log_history if "loss" in e]
    student.save_pretrained(folder)
    labels_only.save_pretrained(folder / "labels_only")
    for target in (folder, folder / "labels_only"):
        (processor if kind == "llama4x" else tokenizer).save_pretrained(target)
    return {
        "kind": kind,
        "data": "digits" if kind == "llama4x" else "text",
        "train_examples": len(rows),
        "steps": steps,
        "batch_size": batch_size,
        "loss": dargs.loss,
        "alpha": dargs.alpha,
        "temperature": dargs.temperature,
        "init": {k: v for k, v in init.items() if k != "expert_counts"},
        "train_seconds": seconds,
        "logs": logs,
        **parameter_counts(student),
    }


def mean_over_seeds(entries: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The mean of each metric over the seeds' entries, with the per-seed values under `per_seed`."""
    per_seed = {metric: [entry[metric] for entry in entries] for metric in entries[0]}
    return {**{metric: sum(v) / len(v) for metric, v in per_seed.items()}, "per_seed": per_seed}


def stage_distill(run: DemoRun) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from .distillation_report import decode_tokens_per_second

    teacher, processor = run.teacher()
    tokenizer = processor.tokenizer
    text_eval = run.data.text_blocks(tokenizer, "eval")
    _, digits_test = run.data.digits
    seeds = [run.settings.seed + i for i in range(run.settings.distill_seeds)]
    students = {}
    for kind in ("llama4x", "llama"):
        trained = [_distill_student(run, teacher, processor, kind, seed) for seed in seeds]
        # the first seed's record (its loss curves are plotted), with every seed's training time
        students[kind] = {**trained[0], "seeds": seeds, "train_seconds": [t["train_seconds"] for t in trained]}
    prompt = tokenizer(TEXT_PROMPTS[0], return_tensors="pt")["input_ids"]
    new_tokens, repeats = (8, 1) if run.settings.quick else (32, 3)

    def speed(model) -> float:
        return decode_tokens_per_second(model, prompt, new_tokens=new_tokens, repeats=repeats)

    def evaluate(model, kind: str) -> dict[str, float]:
        entry = {"text_perplexity": perplexity(model, block_batches(text_eval))}
        if kind == "llama4x":
            answers = answer_questions(model, processor, digits_test, verbose=run.verbose)
            entry["digits_accuracy"] = exact_match(answers, digits_test)
            entry["digits_answer_perplexity"] = answer_perplexity(model, processor, digits_test)
        entry["decode_tokens_per_second"] = speed(model)
        return entry

    evaluation = {"teacher": {"decode_tokens_per_second": speed(teacher)}}
    for kind, auto in (("llama4x", AutoModelForImageTextToText), ("llama", AutoModelForCausalLM)):
        for name, subfolder in (("distilled", ""), ("labels_only", "labels_only")):
            entries = [
                evaluate(auto.from_pretrained(student_folder(run, kind, seed) / subfolder).eval(), kind)
                for seed in seeds
            ]
            evaluation[f"{kind}/{name}"] = mean_over_seeds(entries)
    return {"students": students, "evaluation": evaluation}


def stage_report(run: DemoRun) -> dict[str, Any]:
    from .demo_report import write_report

    return write_report(run.out, run.settings, run.results)


STAGE_FUNCTIONS: dict[str, Callable[[DemoRun], dict[str, Any]]] = {
    "tokenizer": stage_tokenizer,
    "teacher": stage_teacher,
    "evaluate": stage_evaluate,
    "lora": stage_lora,
    "distill": stage_distill,
    "report": stage_report,
}


# ---- the job -------------------------------------------------------------------------------------------------------


def _check_settings(out: Path, settings: DemoSettings) -> None:
    path = out / "settings.json"
    wanted = dataclasses.asdict(settings)
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        if differ:
            listed = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
            raise ValueError(
                f"{out} holds a demo run with other settings ({listed}); use another --out, or delete the folder "
                "to start over."
            )
    else:
        write_json_atomically(path, wanted)


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings | None = None,
    stop_after: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the demo in `out_dir`; return the results of every stage run or found there.

    Args:
        out_dir: the run folder (created if missing). A folder of an earlier run with the same settings resumes it.
        settings: `DemoSettings.create()` by default.
        stop_after: the last stage to run before the report (`"teacher"`, `"evaluate"`, ...); default all.
        verbose: progress bars, stage lines and the summary table (on stdout / stderr).

    Raises:
        ValueError: for bad settings, or a folder holding a run with other settings.
        DemoStageError: when a stage fails (the cause chained); the finished stages stay in `out_dir`.
    """
    settings = settings or DemoSettings.create()
    if stop_after is not None and stop_after not in STAGES[:-1]:
        raise ValueError(f"Invalid `stop_after`={stop_after!r}: expected one of {STAGES[:-1]}.")
    out = Path(out_dir).resolve()  # absolute: the LoRA adapter names its base model by this path
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _run_stages(out, settings, stop_after, verbose)
    finally:
        torch.set_num_threads(threads)


def _run_stages(out: Path, settings: DemoSettings, stop_after: str | None, verbose: bool) -> dict[str, Any]:
    from .demo_report import summary_table

    say = tqdm.write if verbose else (lambda *args, **kwargs: None)
    run = DemoRun(out, settings, verbose)
    last = STAGES.index(stop_after) if stop_after else len(STAGES) - 2
    selected = [*STAGES[: last + 1], "report"]
    rows: list[dict[str, Any]] = []
    redo = False
    say(f"llama4x demo -> {out} ({'quick' if settings.quick else 'full'} run, fusion={settings.fusion})")
    for index, name in enumerate(selected, 1):
        marker = out / "stages" / f"{name}.json"
        saved = json.loads(marker.read_text()) if marker.is_file() and not redo else None
        if saved is not None and name == "report" and saved["result"].get("stages") != selected[:-1]:
            saved = None  # a report of another set of stages
        if saved is not None:
            run.results[name] = saved["result"]
            rows.append({"stage": name, "status": "skipped (done)", "seconds": saved["seconds"]})
            say(f"[{index}/{len(selected)}] {name}: already done in {out} ({saved['seconds']:.0f} s), skipped")
            continue
        if not redo:  # the later stages' markers describe outputs built on the ones this stage replaces
            for later in STAGES[STAGES.index(name) + 1 :]:
                (out / "stages" / f"{later}.json").unlink(missing_ok=True)
        redo = True
        say(f"[{index}/{len(selected)}] {name}: {STAGE_TITLES[name]}")
        start = time.perf_counter()
        try:
            result = STAGE_FUNCTIONS[name](run)
        except Exception as error:
            rows.append({"stage": name, "status": "FAILED", "seconds": time.perf_counter() - start})
            say(summary_table(rows, run.results))
            raise DemoStageError(
                f"stage {index} ({name}) failed: {type(error).__name__}: {error}. The finished stages are kept in "
                f"{out}; rerun the same command to resume from this stage."
            ) from error
        seconds = time.perf_counter() - start
        run.results[name] = result
        write_json_atomically(marker, {"stage": name, "seconds": seconds, "finished": time.time(), "result": result})
        rows.append({"stage": name, "status": "done", "seconds": seconds})
    say(summary_table(rows, run.results))
    if "report" in run.results:
        say(f"report: {out / 'report.md'}")
    return run.results
