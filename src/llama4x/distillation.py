"""Distillation of a llama4x MoE teacher into a dense student, on `transformers.Trainer`.

    llama4x distill --teacher DIR --out DIR                                   # llama4x student, forward KL, online
    llama4x distill --teacher DIR --out DIR --student-kind llama --layers 2   # 2-layer LlamaForCausalLM student
    llama4x distill --teacher DIR --out DIR --loss topk_kl --top-k 32 --offline   # teacher top-32 cached first

The pieces, usable on their own:

- `student_config` / `init_student_from_teacher` (`distillation_students.py`): a dense student of the teacher
  (`"llama4x"` kind: no MoE layers, iRoPE and vision kept; `"llama"` kind: plain transformers Llama), initialised
  from the teacher's embeddings, attention, norms and frequency-merged experts, or randomly.
- `distillation_loss` (`distillation_losses.py`): forward / reverse KL, generalized JSD, top-k KL, temperature,
  `alpha` mix with the label loss, padding and prompt masks; `HiddenStateAligner` for hidden-state MSE.
- `DistillationTrainer` + `DistillationArguments` (here): online (the frozen teacher runs in the loop, optionally on
  its own device) or offline (`build_teacher_cache`, `distillation_cache.py`, writes the teacher's top-k logits to
  safetensors shards first; training reads them lazily, so neither the teacher nor the cache needs to be in memory).
- `distillation_report` (`distillation_report.py`): held-out perplexity (and digits accuracy for multimodal runs) of
  teacher, distilled student and a labels-only student, sizes, memory and decode speed; markdown, JSON and a plot.
- `distill`: the whole job behind `llama4x distill` and `scripts/distill.py`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed
from transformers.utils import logging

from .checkpoints import refuse_output_over_input
from .data import DOCS_EVAL_FRACTION, lm_rows, python_docs_split
from .distillation_cache import (
    CACHE_DTYPES,
    CACHE_KEYS,
    CACHE_META,
    TeacherCache,
    TeacherCacheCollator,
    TeacherCacheDataset,
    build_teacher_cache,
    prepare_teacher_cache,
)
from .distillation_losses import (
    LOSS_KINDS,
    HiddenStateAligner,
    TeacherTopK,
    _check_arguments,
    counted_positions,
    distillation_loss,
)
from .distillation_report import distillation_report
from .distillation_students import (
    INPUT_KEYS,
    STUDENT_KINDS,
    active_ffn_size,
    check_vocab,
    init_student_from_teacher,
    select_layers,
    student_config,
)
from .validation import check_device

__all__ = [
    "CACHE_META",
    "LOSS_KINDS",
    "STUDENT_KINDS",
    "DistillationArguments",
    "DistillationTrainer",
    "HiddenStateAligner",
    "TeacherCache",
    "TeacherTopK",
    "active_ffn_size",
    "add_distill_arguments",
    "build_teacher_cache",
    "check_vocab",
    "distill",
    "distillation_loss",
    "distillation_report",
    "distillation_training_arguments",
    "init_student_from_teacher",
    "prepare_teacher_cache",
    "select_layers",
    "student_config",
]

logger = logging.get_logger(__name__)

HIDDEN_LAYERS = ("last", "mapped")


@dataclass
class DistillationArguments:
    """What `DistillationTrainer` distills with (the optimisation itself is `TrainingArguments`)."""

    loss: str = field(default="forward_kl", metadata={"help": f"Distillation loss: one of {', '.join(LOSS_KINDS)}."})
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of both models; the loss is scaled by T^2."}
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the distillation term; 1 - alpha weighs the label cross-entropy (0: labels only)."
        },
    )
    beta: float = field(default=0.5, metadata={"help": "Mixture weight of the generalized JSD (jsd), in (0, 1)."})
    top_k: int = field(
        default=64, metadata={"help": "Teacher logits kept per position by topk_kl (and by an offline cache for it)."}
    )
    hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state MSE (online only; 0 disables it)."}
    )
    hidden_layers: str = field(
        default="last",
        metadata={
            "help": "Hidden states aligned: last (the final normalised states) or mapped (also each student layer "
            "with the teacher layer it was taken from)."
        },
    )
    offline: bool = field(
        default=False,
        metadata={
            "help": "Cache the teacher's logits to disk in a first pass and train from the cache (top_k of them for "
            "topk_kl, the whole vocabulary for the other losses)."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the offline cache (default: OUTPUT_DIR/teacher_cache); reused when "
            "it holds the same data, teacher vocabulary and top-k."
        },
    )
    cache_dtype: str = field(default="float32", metadata={"help": "Stored logit dtype: float32, bfloat16 or float16."})
    cache_batch_size: int = field(default=8, metadata={"help": "Batch size of the teacher pass that fills the cache."})
    teacher_device: str | None = field(
        default=None, metadata={"help": "Device of the teacher (default: the student's), e.g. cuda:1 or cpu."}
    )

    def __post_init__(self):
        _check_arguments(self.loss, self.temperature, self.alpha, self.beta, self.top_k)
        if not (math.isfinite(self.hidden_weight) and self.hidden_weight >= 0):
            raise ValueError(f"Invalid `hidden_weight`={self.hidden_weight!r}: expected a finite weight >= 0.")
        if self.cache_batch_size < 1:
            raise ValueError(f"Invalid `cache_batch_size`={self.cache_batch_size!r}: expected an integer >= 1.")
        if self.teacher_device is not None:
            check_device("--teacher-device", self.teacher_device)
        if self.hidden_layers not in HIDDEN_LAYERS:
            raise ValueError(f"Invalid `hidden_layers`={self.hidden_layers!r}: expected one of {HIDDEN_LAYERS}.")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"Invalid `cache_dtype`={self.cache_dtype!r}: expected one of {sorted(CACHE_DTYPES)}.")
        if self.offline and self.hidden_weight > 0:
            raise ValueError("`hidden_weight` > 0 needs the teacher's hidden states: use online distillation.")

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.hidden_weight > 0


# ---- trainer ------------------------------------------------------------------------------------------------------


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is `distillation_loss` between the model (the student) and a frozen teacher.

    Online: the teacher (eval mode, no gradients, on `distillation_args.teacher_device` or the student's device) runs
    on every batch, images included for multimodal models. Offline: at construction the teacher's logits over
    `train_dataset` are cached to disk (`prepare_teacher_cache`), the teacher is released, and training reads the
    cache; evaluation batches, which are not cached, then get the label loss only. With `alpha == 0` and no hidden
    alignment no teacher is needed: the labels-only baseline of the same trainer. In training the loss is the mean over
    the counted positions of the whole accumulated batch (all processes), not a mean of micro-batch means.

    The logs add `kd_loss`, `ce_loss` (and `hidden_loss`): unweighted means since the previous log. With hidden-state
    alignment the learned projection trains with the student (own parameter group, no weight decay) and is not saved.
    Datasets of raw records (e.g. `digits_vqa` with `DigitsCollator`) need `remove_unused_columns=False`, as with any
    `Trainer`; the cached-logit keys are always kept.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        teacher: torch.nn.Module | None = None,
        distillation_args: DistillationArguments | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        **kwargs,
    ):
        self.distillation_args = distillation_args = distillation_args or DistillationArguments()
        args = args if args is not None else TrainingArguments(output_dir="distillation")
        if teacher is not None:
            check_vocab(model, teacher)
            teacher.eval().requires_grad_(False)
            if getattr(teacher, "hf_device_map", None) is None:
                teacher.to(distillation_args.teacher_device or args.device)
        if not distillation_args.needs_teacher:
            teacher = None
        elif distillation_args.offline and train_dataset is not None:
            collator = data_collator or default_data_collator
            vocab_size = model.config.get_text_config().vocab_size
            k = distillation_args.top_k if distillation_args.loss == "topk_kl" else vocab_size
            cache_dir = distillation_args.cache_dir or str(Path(args.output_dir) / "teacher_cache")
            self.teacher_cache = prepare_teacher_cache(
                teacher, train_dataset, collator, cache_dir, k, vocab_size,
                distillation_args.cache_batch_size, distillation_args.cache_dtype,
            )  # fmt: skip
            train_dataset, data_collator = (
                TeacherCacheDataset(train_dataset, self.teacher_cache),
                TeacherCacheCollator(collator),
            )
            teacher = None
        elif teacher is None:
            raise ValueError("Online distillation (alpha > 0 or hidden_weight > 0) needs a `teacher`.")
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset, **kwargs)
        self.teacher = teacher
        self.aligner = None
        if distillation_args.hidden_weight > 0:
            self.aligner = self._make_aligner(model, teacher).to(self.args.device)
        self._parts: dict[str, torch.Tensor] = {}
        self._parts_steps = 0

    def _make_aligner(self, student, teacher) -> HiddenStateAligner:
        """Final states with final states; with `hidden_layers="mapped"` also the output of each other student layer
        with that of the teacher layer it was taken from (`hidden_states[i + 1]`: the output of layer i)."""
        s_config, t_config = student.config.get_text_config(), teacher.config.get_text_config()
        pairs = [(-1, -1)]
        if self.distillation_args.hidden_layers == "mapped":
            kept = getattr(s_config, "distillation", {}).get("teacher_layers")
            kept = select_layers(t_config.num_hidden_layers, s_config.num_hidden_layers, kept)
            pairs = [(i + 1, j + 1) for i, j in enumerate(kept[:-1])] + pairs
        return HiddenStateAligner(s_config.hidden_size, t_config.hidden_size, pairs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [key for key in CACHE_KEYS if key not in self._signature_columns]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = list(self.aligner.parameters()) if self.aligner is not None else []
        if params and not any(params[0] is p for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    @torch.no_grad()
    def teacher_forward(self, inputs: dict[str, torch.Tensor], hidden_states: bool = False):
        device = self.teacher.device
        teacher_inputs = {key: inputs[key].to(device) for key in INPUT_KEYS if inputs.get(key) is not None}
        return self.teacher(**teacher_inputs, output_hidden_states=hidden_states)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        dargs = self.distillation_args
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        cached = [inputs.pop(key, None) for key in CACHE_KEYS]
        hidden = self.aligner is not None
        outputs = model(**inputs, output_hidden_states=True) if hidden else model(**inputs)
        logits = outputs.logits
        teacher_logits, teacher_outputs, alpha = None, None, dargs.alpha
        if cached[0] is not None:
            teacher_logits = TeacherTopK(*cached)
        elif self.teacher is not None:
            teacher_outputs = self.teacher_forward(inputs, hidden)
            teacher_logits = teacher_outputs.logits.to(logits.device)
        elif dargs.needs_teacher:
            alpha = 0.0  # an offline run's evaluation batches: no cached teacher logits
        loss, parts = distillation_loss(
            logits, teacher_logits if alpha > 0 else None, labels, inputs.get("attention_mask"), kind=dargs.loss,
            temperature=dargs.temperature, alpha=alpha, beta=dargs.beta, top_k=dargs.top_k, return_parts=True,
        )  # fmt: skip
        if hidden and teacher_outputs is not None:
            hidden_loss = self.aligner(
                outputs.hidden_states, teacher_outputs.hidden_states, labels, inputs.get("attention_mask")
            )
            loss = loss + dargs.hidden_weight * hidden_loss
            parts["hidden_loss"] = hidden_loss.detach()
        if model.training:
            if num_items_in_batch is not None:
                loss = self._token_weighted(loss, labels, inputs.get("attention_mask"), logits, num_items_in_batch)
            for key, value in parts.items():
                self._parts[key] = self._parts.get(key, 0.0) + value.float()
            self._parts_steps += 1
        return (loss, outputs) if return_outputs else loss

    def _token_weighted(self, loss, labels, mask, logits, num_items_in_batch) -> torch.Tensor:
        """The micro-batch mean `loss` as its share of the mean over all the positions of the accumulated batch (and
        of every process: `num_items_in_batch`, which the Trainer then neither divides by the accumulation steps nor
        averages over processes), so that accumulation gives the gradient of one big batch, as for the LM loss."""
        count = counted_positions(labels, mask, logits.shape[:2], logits.device).sum()
        if self.args.average_tokens_across_devices:  # the count is over all processes, whose gradients DDP averages
            count = count * (self.accelerator.num_processes // self.get_tp_size())
        return loss * count / torch.as_tensor(num_items_in_batch, device=loss.device).clamp_min(1)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._parts_steps:
            for key, total in self._parts.items():
                gathered = self.accelerator.gather(total.reshape(1).to(self.args.device)).mean()
                logs[key] = round(gathered.item() / self._parts_steps, 6)
            self._parts, self._parts_steps = {}, 0
        super().log(logs, *args, **kwargs)


# ---- the `llama4x distill` job ------------------------------------------------------------------------------------


def _load_teacher(teacher_dir: str | Path):
    """`(teacher, processing, composite)`: the model, its processor (composite) or tokenizer, and which it is."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    from .configuration_llama4x import Llama4XConfig, Llama4XTextConfig

    config = AutoConfig.from_pretrained(teacher_dir)
    if isinstance(config, Llama4XConfig):
        return (
            AutoModelForImageTextToText.from_pretrained(teacher_dir),
            AutoProcessor.from_pretrained(teacher_dir),
            True,
        )
    if not isinstance(config, Llama4XTextConfig):
        raise ValueError(f"--teacher {str(teacher_dir)!r} holds a {type(config).__name__}; expected a llama4x model.")
    return AutoModelForCausalLM.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir), False


def collated_batches(rows: Sequence, collator: Callable, batch_size: int, limit: int | None = None) -> list[dict]:
    """`rows` cut, in order, into batches of `batch_size` (the last one may be smaller), at most `limit` of them
    (fewer when the rows run out), each passed through `collator`."""
    return [collator(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)[:limit]]


def _new_student(config):
    from transformers import LlamaForCausalLM

    from .configuration_llama4x import Llama4XConfig
    from .modeling_llama4x import Llama4XForCausalLM
    from .modeling_multimodal import Llama4XForConditionalGeneration

    if isinstance(config, Llama4XConfig):
        return Llama4XForConditionalGeneration(config)
    if config.model_type == "llama":
        return LlamaForCausalLM(config)
    return Llama4XForCausalLM(config)


def distillation_training_arguments(
    output_dir: str | Path, steps: int, learning_rate: float, batch_size: int, seed: int, **overrides: Any
) -> TrainingArguments:
    """`TrainingArguments` of a `steps`-step student run: cosine schedule after a 5% warm-up, about 20 logs, no
    checkpoints or reporting, the GPU when there is one; `overrides` replace any of them."""
    fields = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, steps // 20),
        "weight_decay": 0.0,
        "logging_steps": max(1, steps // 20),
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "remove_unused_columns": False,  # digits records and cached logits reach the collator whole
        "seed": seed,
        "use_cpu": not torch.cuda.is_available(),
    }
    return TrainingArguments(**{**fields, **overrides})


def check_teacher_held_out_docs(teacher: str | Path) -> None:
    """Refuse a teacher that trained on documents which `distill` holds out of the bundled docs: one `llama4x train`
    trained on pydocs holding out fewer of them (`train_results.json` records its split; for a `checkpoint-N` folder,
    the run folder's). A distilled student would learn those documents from the teacher's soft targets and look
    better than it is. What a teacher trained on before its last `llama4x train` run is not recorded."""
    teacher = Path(teacher)
    records = [teacher / "train_results.json"]
    if teacher.name.startswith("checkpoint-"):
        records.append(teacher.parent / "train_results.json")
    record = next((path for path in records if path.is_file()), None)
    if record is None:
        return
    data = json.loads(record.read_text()).get("data")
    if data is None:
        logger.warning(
            f"{record} does not record the teacher's data split (written before llama4x recorded it): if the teacher "
            "trained on the bundled docs, it may have trained on the documents `distill` evaluates on."
        )
        return
    if data["dataset"] != "pydocs":
        return
    held_out = python_docs_split()[1]
    never_seen = python_docs_split(data["eval_fraction"])[1] if data["eval_fraction"] > 0 else []
    seen = len(set(held_out) - set(never_seen))
    if seen:
        raise ValueError(
            f"The teacher in {teacher} trained on {seen} of the {len(held_out)} documents that distill holds out of "
            f"the bundled docs: it was trained with --eval_fraction {data['eval_fraction']} ({record}), distill "
            f"evaluates on the split at {DOCS_EVAL_FRACTION}. Train the teacher with --eval_fraction "
            f"{DOCS_EVAL_FRACTION} or more."
        )


def distill(
    teacher: str | Path,
    out: str | Path,
    student_kind: str = "llama4x",
    layers: int | Sequence[int] | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    init: str = "teacher",
    dataset: str | None = None,
    steps: int = 200,
    batch_size: int = 8,
    block_size: int = 128,
    learning_rate: float = 3e-3,
    seed: int = 0,
    calibration_batches: int = 4,
    eval_size: int = 32,
    baseline: bool = True,
    distillation_args: DistillationArguments | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Distill the llama4x model saved in `teacher` into a dense student saved in `out`, with a report.

    Data: `dataset="pydocs"` (Python's docs, packed into `block_size` blocks; default for text teachers) or
    `"digits"` (digits VQA with images; default for a composite teacher with a `"llama4x"` student). The student
    (`student_config(kind=student_kind, num_layers / layers, hidden_size, intermediate_size)`) is initialised from
    the teacher with `calibration_batches` training batches (`init="teacher"`) or randomly (`init="random"`), then
    trained `steps` steps with `DistillationTrainer`; with `baseline`, a copy of the same initial student is trained
    the same steps on the labels only (`alpha=0`). `eval_size` held-out blocks (text) or questions (digits) measure them.
    `callbacks` (`TrainerCallback`s, as for `llama4x.training.train`) go to the Trainer of each student.

    Writes to `out`: the student and the tokenizer / processor, `labels_only/` (the baseline),
    `distillation_report.{md,json,png}`, `teacher_cache/` (offline), `runs/` (trainer logs). Returns the report.
    """
    dargs = distillation_args or DistillationArguments()
    out = Path(out)
    refuse_output_over_input(out, teacher, names=("--out", "the --teacher folder"), inside_ok=True)
    if dargs.offline and dargs.cache_dir is None:
        dargs = dataclasses.replace(dargs, cache_dir=str(out / "teacher_cache"))
    if student_kind not in STUDENT_KINDS:
        raise ValueError(f"Invalid student kind {student_kind!r}: expected one of {STUDENT_KINDS}.")
    if init not in ("teacher", "random"):
        raise ValueError(f"Invalid init {init!r}: expected 'teacher' or 'random'.")
    for name, value, least in (("steps", steps, 1), ("batch_size", batch_size, 1), ("block_size", block_size, 2),
                               ("eval_size", eval_size, 1)):  # fmt: skip
        if value < least:  # a block of one token has no next token to predict
            raise ValueError(f"Invalid {name}={value!r}: expected an integer >= {least}.")
    if calibration_batches < 0:
        raise ValueError(f"Invalid calibration_batches={calibration_batches!r}: expected an integer >= 0.")
    start = time.perf_counter()
    set_seed(seed)
    teacher_model, processing, composite = _load_teacher(teacher)
    tokenizer = processing.tokenizer if composite else processing
    dataset = dataset or ("digits" if composite and student_kind == "llama4x" else "pydocs")
    if dataset == "pydocs":
        check_teacher_held_out_docs(teacher)
    if dataset == "digits" and not (composite and student_kind == "llama4x"):
        raise ValueError(
            "dataset 'digits' needs a multimodal teacher and a 'llama4x' student (a llama student is text-only)."
        )
    if dataset not in ("pydocs", "digits"):
        raise ValueError(f"Invalid dataset {dataset!r}: expected 'pydocs' or 'digits'.")

    digits_test = None
    if dataset == "digits":
        from .data import DigitsCollator, digits_vqa

        train_rows, digits_test = digits_vqa(image_size=teacher_model.config.vision_config.image_size)
        digits_test = digits_test[:eval_size]
        collator = DigitsCollator(processing)
        eval_rows = digits_test
    else:
        train_texts, eval_texts = python_docs_split()
        train_rows = lm_rows(tokenizer, train_texts, block_size)
        eval_rows = lm_rows(tokenizer, eval_texts, block_size)[:eval_size]
        collator = default_data_collator
    eval_batches = collated_batches(eval_rows, collator, batch_size)

    count = layers if isinstance(layers, int) else None
    chosen = list(layers) if layers is not None and not isinstance(layers, int) else None
    config = student_config(teacher_model.config, student_kind, count, chosen, hidden_size, intermediate_size)
    torch.manual_seed(seed)
    student = _new_student(config)
    init_info = None
    if init == "teacher":
        calibration = collated_batches(train_rows, collator, batch_size, calibration_batches)
        init_info = init_student_from_teacher(student, teacher_model, calibration)
    labels_only = copy.deepcopy(student) if baseline else None

    trainer = DistillationTrainer(
        model=student, teacher=teacher_model, distillation_args=dargs,
        args=distillation_training_arguments(out / "runs" / "distilled", steps, learning_rate, batch_size, seed),
        train_dataset=train_rows, data_collator=collator, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.train()
    logs = {"distilled": trainer.state.log_history}
    models = {"teacher": teacher_model, "distilled": student}
    if labels_only is not None:
        baseline_args = dataclasses.replace(dargs, alpha=0.0, hidden_weight=0.0, offline=False)
        baseline_trainer = DistillationTrainer(
            model=labels_only, distillation_args=baseline_args,
            args=distillation_training_arguments(out / "runs" / "labels_only", steps, learning_rate, batch_size, seed),
            train_dataset=train_rows, data_collator=collator, callbacks=list(callbacks),
        )  # fmt: skip
        baseline_trainer.train()
        logs["labels_only"] = baseline_trainer.state.log_history
        models["labels_only"] = labels_only
        labels_only.save_pretrained(out / "labels_only")

    student.save_pretrained(out)
    (processing if student_kind == "llama4x" else tokenizer).save_pretrained(out)
    settings = {
        "loss": dargs.loss, "temperature": dargs.temperature, "alpha": dargs.alpha, "top_k": dargs.top_k,
        "hidden_weight": dargs.hidden_weight, "offline": dargs.offline, "init": init, "dataset": dataset,
        "batch_size": batch_size, "block_size": block_size, "learning_rate": learning_rate, "seed": seed,
    }  # fmt: skip
    extra = {
        "teacher": str(teacher), "student_kind": student_kind, "steps": steps, "settings": settings,
        "teacher_layers": config.get_text_config().distillation["teacher_layers"], "init": init_info,
        "train_seconds": round(time.perf_counter() - start, 1), "device": str(trainer.args.device), "logs": logs,
    }  # fmt: skip
    if dataset == "digits":  # decode speed from a text prompt: image tokens would need pixels
        prompt_ids = tokenizer(digits_test[0]["question"], return_tensors="pt")["input_ids"]
    else:
        prompt_ids = eval_batches[0]["input_ids"][:1, :16]
    return distillation_report(
        models, eval_batches, out, prompt_ids, processor=processing if composite else None,
        digits_records=digits_test, extra=extra,
    )  # fmt: skip


def _parse_layers(value: str) -> int | list[int]:
    """`--layers 2` (evenly spaced) or `--layers 0,3` (those teacher layers)."""
    try:
        return [int(v) for v in value.split(",")] if "," in value else int(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--layers {value!r}: expected N or comma-separated indices") from error


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `llama4x distill` / `scripts/distill.py`: the job's, then every `DistillationArguments` field."""
    job = parser.add_argument_group("job")
    job.add_argument("--teacher", required=True, help="folder of the llama4x teacher (save_pretrained + tokenizer)")
    job.add_argument("--out", required=True, help="folder for the student, the baseline and the report")
    job.add_argument("--student-kind", default="llama4x", choices=STUDENT_KINDS, help="default: %(default)s")
    job.add_argument("--layers", type=_parse_layers, default=None, help="N evenly spaced teacher layers, or i,j,...")
    job.add_argument("--hidden-size", type=int, default=None, help="student width (default: the teacher's)")
    job.add_argument("--intermediate-size", type=int, default=None, help="student FFN width (default: active)")
    job.add_argument("--init", default="teacher", choices=("teacher", "random"), help="default: %(default)s")
    job.add_argument("--dataset", default=None, choices=("pydocs", "digits"), help="default: by teacher kind")
    job.add_argument("--steps", type=int, default=200, help="training steps per student (default: %(default)s)")
    job.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    job.add_argument("--block-size", type=int, default=128, help="text block length (default: %(default)s)")
    job.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, cosine (default: %(default)s)")
    job.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    job.add_argument("--calibration-batches", type=int, default=4, help="batches measuring routing (default: 4)")
    job.add_argument("--eval-size", type=int, default=32, help="held-out blocks / questions (default: 32)")
    job.add_argument("--no-baseline", action="store_true", help="skip the labels-only student")
    group = parser.add_argument_group("distillation")
    for f in dataclasses.fields(DistillationArguments):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if f.type == "bool":
            group.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = {"float": float, "int": int}.get(f.type, str)
        group.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: %(default)s)")


def run_distill_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run `distill` from parsed `add_distill_arguments` options."""
    dargs = DistillationArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillationArguments)})
    return distill(
        args.teacher, args.out, student_kind=args.student_kind, layers=args.layers, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, init=args.init, dataset=args.dataset, steps=args.steps,
        batch_size=args.batch_size, block_size=args.block_size, learning_rate=args.lr, seed=args.seed,
        calibration_batches=args.calibration_batches, eval_size=args.eval_size, baseline=not args.no_baseline,
        distillation_args=dargs,
    )  # fmt: skip
