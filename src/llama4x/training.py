"""The library behind `llama4x train`: fine-tune or pretrain llama4x with `transformers.Trainer`.

    llama4x train --preset tiny --dataset pydocs --output-dir out --max-steps 200
    llama4x train --model DIR --dataset chat.jsonl --lora --lora-parts attention,routed_experts --output-dir out
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --use_cpu --model DIR --dataset data.parquet ...

Several processes: `accelerate launch` starts them (torchrun) and the Trainer wraps the model in DDP; on a machine
without GPUs `--use_cpu` makes them CPU processes that reduce over gloo (accelerate's own `--cpu` flag starts a
single process unless MPI is set up). Every parameter takes part in every step (each layer's experts are one
stacked parameter), so DDP runs without its unused-parameter search, and experts that get no tokens cannot hang it.

Arguments come from four dataclasses parsed together by `HfArgumentParser`: `ModelArguments`, `DataArguments`,
`LoraArguments` and `Llama4XTrainingArguments` (every `transformers.TrainingArguments` field, plus `--resume`).

Datasets (`--dataset`): see `llama4x.training_data`.

Logs: the Trainer's loss plus `lm_loss`, `aux_loss`, `z_loss` (the unweighted balancing losses) and the routing
statistics of `llama4x.monitoring.RoutingStatsCallback`. The output folder receives the model (or the LoRA adapter),
the tokenizer or processor, `train_results.json`, `loss_curve.png` and `expert_load.png`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from .checkpoints import check_model_source, last_complete_checkpoint, verify_trainer_checkpoint
from .data import IGNORE_INDEX
from .monitoring import RoutingStatsCallback, find_text_model
from .training_data import DataArguments, build_data, load_raw_data, texts_for_tokenizer

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Folder (or Hub id) of a llama4x model to fine-tune; without it a model is built from --preset."
        },
    )
    preset: str = field(
        default="tiny", metadata={"help": "Preset of a new, randomly initialised model (tiny, scout, maverick)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of text-config fields to override, e.g. '{\"router_bias_update_rate\": 0.001}' "
            "(applied to --preset and to --model alike)."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder; defaults to --model. A new model without one gets a byte-level BPE tokenizer "
            "trained on the training data."
        },
    )
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary size of a newly trained tokenizer."})
    experts_implementation: str | None = field(
        default=None, metadata={"help": "Routed experts kernel: grouped_mm (default), batched_mm or eager."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel: sdpa, eager, ..."})


@dataclass
class LoraArguments:
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights."})
    lora_parts: str = field(
        default="attention,shared_experts,dense_ffn,routed_experts,router",
        metadata={"help": "Comma-separated parts to adapt, from llama4x.LORA_PARTS."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout (PEFT supports none on the routed experts)."}
    )


@dataclass
class Llama4XTrainingArguments(TrainingArguments):
    output_dir: str | None = field(
        default="llama4x-train", metadata={"help": "Where checkpoints, the final model and the plots go."}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Resume from the last checkpoint in --output-dir (see --resume-from-checkpoint for a path)."
        },
    )


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, LoraArguments, Llama4XTrainingArguments))


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, LoraArguments, Llama4XTrainingArguments]:
    """Parse command-line arguments (default `sys.argv[1:]`); unknown arguments are an error."""
    return make_parser().parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))


# ---- model --------------------------------------------------------------------------------------------------------


def _overrides(model_args: ModelArguments) -> dict[str, Any]:
    if not model_args.config_overrides:
        return {}
    try:
        overrides = json.loads(model_args.config_overrides)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config-overrides is not valid JSON: {error}") from error
    if not isinstance(overrides, dict):
        raise ValueError(f"--config-overrides must be a JSON object, got {model_args.config_overrides!r}.")
    return overrides


def load_processing(model_args: ModelArguments, multimodal: bool):
    """The tokenizer (text data) or processor (image-text data) of `--tokenizer` / `--model`, or None."""
    source = model_args.tokenizer or model_args.model
    if source is None:
        return None
    if multimodal:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def build_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, multimodal: bool):
    """`--model` loaded, or a new `--preset` model sized to the tokenizer; either with `--config-overrides`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from .configuration_llama4x import Llama4XTextConfig

    kwargs = {}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.experts_implementation:
        kwargs["experts_implementation"] = model_args.experts_implementation
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    if model_args.model:
        # A local folder by its absolute path: a LoRA adapter saved from this model names it as its base model.
        source = str(Path(model_args.model).resolve()) if Path(model_args.model).is_dir() else model_args.model
        config = _with_overrides(AutoConfig.from_pretrained(source), _overrides(model_args))
        return auto.from_pretrained(source, config=config, **kwargs)
    if multimodal:
        raise ValueError("Image-text training needs --model: a multimodal llama4x folder with its processor.")
    config = Llama4XTextConfig.from_preset(
        model_args.preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return auto.from_config(_with_overrides(config, _overrides(model_args)), **kwargs)


def _with_overrides(config, overrides: dict[str, Any]):
    """`config` with its text config rebuilt from the overridden fields (so that derived fields and validation see
    the new values); a `ValueError` names the fields it does not have."""
    text_config = getattr(config, "text_config", config)
    unknown = [key for key in overrides if not hasattr(text_config, key)]
    if unknown:
        raise ValueError(f"--config-overrides: {type(text_config).__name__} has no field(s) {unknown}.")
    if not overrides:
        return config
    text_config = type(text_config).from_dict({**text_config.to_dict(), **overrides})
    if not hasattr(config, "text_config"):
        return text_config
    config.text_config = text_config
    return config


def apply_lora(model, lora_args: LoraArguments):
    from peft import get_peft_model

    from .lora import lora_config

    parts = tuple(part.strip() for part in lora_args.lora_parts.split(",") if part.strip())
    text_model = find_text_model(model)
    if text_model is not None and text_model.config.router_bias_update_rate > 0:
        logger.warning("LoRA: the base routers are frozen, so the loss-free balancing biases stay fixed.")
    config = lora_config(
        model, parts=parts, r=lora_args.lora_r, alpha=lora_args.lora_alpha, dropout=lora_args.lora_dropout
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(f"LoRA on {parts}: {trainable:,} trainable of {total:,} parameters")
    return peft_model


# ---- trainer ------------------------------------------------------------------------------------------------------


def _supervised_logits(logits) -> torch.Tensor:
    """The `(B, S, V)` logits among the tensors `prediction_step` collected (it may add aux/z losses first)."""
    if isinstance(logits, torch.Tensor):
        return logits
    return next(t for t in logits if isinstance(t, torch.Tensor) and t.dim() == 3)


def preprocess_logits_for_metrics(logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce each eval batch to `(prediction (B, S), nll (B, S))`, aligned with `labels`: position t holds the
    argmax and the cross-entropy of the prediction of token t (made at t - 1); position 0 holds nothing."""
    logits = _supervised_logits(logits)
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    prediction = logits[:, :-1].argmax(-1)
    first = torch.zeros_like(labels[:, :1])
    return torch.cat([first, prediction], dim=1), torch.cat([first.float(), nll], dim=1)


def compute_metrics(eval_prediction) -> dict[str, float]:
    """LM loss (without balancing terms), perplexity and next-token accuracy over the supervised tokens."""
    (prediction, nll), labels = eval_prediction.predictions, eval_prediction.label_ids
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    count = max(int(mask.sum()), 1)
    lm_loss = float(nll[mask].sum() / count)
    return {
        "lm_loss": lm_loss,
        "perplexity": math.exp(min(lm_loss, 80.0)),
        "accuracy": float((prediction[mask] == labels[mask]).sum() / count),
    }


def enable_cpu_fsdp(accelerator, args: TrainingArguments) -> bool:
    """Make a run of CPU processes that `accelerate launch` started with an FSDP config shard with FSDP2.

    accelerate keeps FSDP only on accelerator devices: for CPU processes (`--use_cpu`, gloo) its state says
    `MULTI_CPU`, drops the FSDP plugin and the run silently trains with DDP. torch's FSDP2 (`fully_shard`) works on
    CPU over gloo, so this puts the plugin back the way accelerate does on GPUs. FSDP1 is refused: accelerate hands it
    the device `cpu:0`, which it rejects, and its full-state-dict save (`offload_to_cpu`) crashes on CPU parameters.
    Returns whether FSDP was enabled.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or args.fsdp_plugin_args is not None
    if state.distributed_type != DistributedType.MULTI_CPU or not wanted:
        return False
    plugin = FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}))
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP on CPU processes needs FSDP2 (`fsdp_version: 2` in the accelerate config): FSDP1 rejects "
            "accelerate's CPU device and crashes saving the full state dict of CPU parameters."
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does on GPUs
    return True


class Llama4XTrainer(Trainer):
    """`Trainer` that logs the LM loss and the balancing losses separately and weights the balancing losses as
    per-batch means under gradient accumulation and data parallelism.

    With a token-count-normalised LM loss (`num_items_in_batch`), the Trainer neither divides the loss by the
    accumulation steps nor averages it over processes (it multiplies by the process count instead); right for the
    LM loss (a sum over tokens), wrong for the balancing losses the model adds (means over one micro-batch). This
    rescales them to their mean over micro-batches and processes, which is what a single process sees.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_parts: dict[str, torch.Tensor] = {}
        self._loss_parts_steps = 0.0

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, resuming only from completely saved checkpoints: `True` takes the last complete
        `checkpoint-N` (skipping ones a kill cut short, which transformers would pick), a path must be complete."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No completely saved checkpoint-* folder in {self.args.output_dir} to resume from.")
        elif resume_from_checkpoint:
            verify_trainer_checkpoint(resume_from_checkpoint)
        checkpoint = None if resume_from_checkpoint is None else str(resume_from_checkpoint)
        return super().train(checkpoint, *args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_cpu_fsdp(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        if training:
            inputs = {**inputs, "output_router_logits": True}  # aux/z losses for the logs
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if training and loss is not None:
            loss = self._reweight_and_record(loss, outputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _reweight_and_record(self, loss, outputs, num_items_in_batch):
        text_model = find_text_model(self.accelerator.unwrap_model(self.model))
        config = text_model.config if text_model is not None else None
        aux, z = getattr(outputs, "aux_loss", None), getattr(outputs, "z_loss", None)
        balancing = torch.zeros((), device=loss.device)
        if config is not None and aux is not None and config.router_aux_loss_coef > 0:
            balancing = balancing + config.router_aux_loss_coef * aux.to(loss.device)
        if config is not None and z is not None and config.router_z_loss_coef > 0:
            balancing = balancing + config.router_z_loss_coef * z.to(loss.device)
        steps = self.current_gradient_accumulation_steps
        normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        process_scale = 1
        if normalised and self.args.average_tokens_across_devices:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            process_scale = self.accelerator.num_processes // tp_size
        if normalised:
            # loss = (lm + balancing) * process_scale, summed over micro-batches and averaged over processes by DDP.
            loss = loss - balancing * (process_scale - 1.0 / steps)
            lm_share = loss.detach() - balancing.detach() / steps
        else:  # the Trainer divides the whole loss by the accumulation steps
            lm_share = (loss.detach() - balancing.detach()) / steps
        parts = {"lm_loss": lm_share}
        if aux is not None:
            parts["aux_loss"] = aux.detach().float() / steps
        if z is not None:
            parts["z_loss"] = z.detach().float() / steps
        for key, value in parts.items():
            self._loss_parts[key] = self._loss_parts.get(key, 0.0) + value.to(loss.device)
        self._loss_parts_steps += 1.0 / steps
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._loss_parts_steps > 0:
            for key, total in self._loss_parts.items():
                gathered = self.accelerator.gather(total.reshape(1)).mean()
                logs[key] = round(gathered.item() / self._loss_parts_steps, 6)
            self._loss_parts, self._loss_parts_steps = {}, 0.0
        super().log(logs, *args, **kwargs)


# ---- plots and results --------------------------------------------------------------------------------------------


def plot_losses(log_history: list[dict[str, Any]], path: str | Path) -> Path:
    """PNG of the training loss (and LM loss) per logged step and the eval LM loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (
        ("loss", "train loss", "-"),
        ("lm_loss", "train LM loss", "--"),
        ("eval_lm_loss", "eval LM loss", "o-"),
    ):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("llama4x training")
    ax.grid(alpha=0.3)
    if ax.lines:  # a run shorter than --logging-steps logs no loss
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def balancing_bias_spread(trainer: Trainer) -> float | None:
    """Largest difference of the loss-free balancing biases between processes (0 when they agree), or None."""
    text_model = find_text_model(trainer.accelerator.unwrap_model(trainer.model))
    if text_model is None:
        return None
    biases = [b.e_score_correction_bias for b in text_model.moe_blocks if b.e_score_correction_bias is not None]
    if not biases:
        return None
    local = torch.stack(biases).float().to(trainer.args.device)  # (L, E)
    gathered = trainer.accelerator.gather(local.unsqueeze(0))  # (processes, L, E)
    return float((gathered - gathered[:1]).abs().max())


def new_tokenizer(kind, train_rows, data_args, model_args, training_args, resume) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on the training rows, or the one a resumed run trained.

    The main process trains and saves it (to `output_dir/tokenizer`); every process then loads that copy, so all
    processes of a distributed run share one vocabulary.
    """
    from transformers import AutoTokenizer

    from .tokenization import train_tokenizer

    if resume is not None and (Path(resume) / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(resume)
    folder = Path(training_args.output_dir) / "tokenizer"
    with training_args.main_process_first(desc="tokenizer"):
        if training_args.local_process_index == 0:
            texts = texts_for_tokenizer(kind, train_rows, data_args)
            train_tokenizer(texts, vocab_size=model_args.tokenizer_vocab_size).save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


# ---- entry point --------------------------------------------------------------------------------------------------


def check_sources(model_args: ModelArguments, training_args: Llama4XTrainingArguments) -> None:
    """Before any work: the local folders named by --model, --tokenizer and --resume-from-checkpoint."""
    if model_args.model:
        check_model_source("--model", model_args.model, tokenizer=model_args.tokenizer is None)
    if model_args.tokenizer:
        check_model_source("--tokenizer", model_args.tokenizer, config=False)
    if training_args.resume_from_checkpoint:
        verify_trainer_checkpoint(training_args.resume_from_checkpoint)


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    training_args: Llama4XTrainingArguments,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Run one training job; returns the final metrics (also written to `output_dir/train_results.json`)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise ValueError(
            f"Launched as {launched} processes, but the Trainer sees no data-parallel group (each process would train "
            "alone on all the data). On a machine without GPUs pass --use_cpu, so the processes reduce over gloo."
        )
    if not 0 <= training_args.seed < 2**32:
        raise ValueError(f"--seed {training_args.seed} is out of range: expected 0 <= seed < 2**32.")
    set_seed(training_args.seed)
    check_sources(model_args, training_args)
    output_dir = Path(training_args.output_dir)
    kind, train_rows, eval_rows, root = load_raw_data(data_args, training_args.seed)
    multimodal = kind in ("digits", "image_text")

    resume = training_args.resume_from_checkpoint
    if training_args.resume and resume is None:
        resume = last_complete_checkpoint(output_dir)
        if resume is None:
            raise ValueError(f"--resume: no completely saved checkpoint-* folder in --output-dir {str(output_dir)!r}.")

    processing = load_processing(model_args, multimodal)
    if processing is None:
        processing = new_tokenizer(kind, train_rows, data_args, model_args, training_args, resume)
    tokenizer = processing.tokenizer if multimodal else processing
    with training_args.main_process_first(desc="dataset"):
        data = build_data(kind, train_rows, eval_rows, root, processing, data_args)

    model = build_model(model_args, tokenizer, multimodal)
    if lora_args.lora:
        model = apply_lora(model, lora_args)
    if multimodal:
        training_args.remove_unused_columns = False  # the collator reads the raw records
    elif training_args.ddp_find_unused_parameters is None:
        # Stacked experts are one parameter per projection, used whenever any expert of the layer gets a token, so
        # every parameter takes part in every step; skipping DDP's unused-parameter search is safe and cheaper.
        training_args.ddp_find_unused_parameters = False

    trainer = Llama4XTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=processing,
        compute_metrics=compute_metrics if data.eval is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if data.eval is not None else None,
        callbacks=list(callbacks),
    )
    RoutingStatsCallback.attach(trainer)

    train_output = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(train_output.metrics)
    if data.eval is not None:
        metrics.update(trainer.evaluate())
    spread = balancing_bias_spread(trainer)
    if spread is not None:
        metrics["moe/balancing_bias_process_spread"] = spread
    trainer.save_model()
    if trainer.is_world_process_zero():
        trainer.save_state()
        results = {
            "metrics": metrics,
            "log_history": trainer.state.log_history,
            "data_kind": kind,
            # what `llama4x distill` checks: that it holds out no document this model trained on
            "data": {"dataset": data_args.dataset, "eval_fraction": data_args.eval_fraction},
        }
        (output_dir / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_losses(trainer.state.log_history, output_dir / "loss_curve.png")
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`llama4x train` / `scripts/train.py`: parse `argv` and train."""
    return train(*parse_args(argv))
