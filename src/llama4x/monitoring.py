"""Routing statistics in training: a `TrainerCallback` that logs them and an expert-load heatmap."""

from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .balancing import routing_stats


def find_text_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The llama4x decoder inside `model` (a CausalLM, a PEFT wrapper, a DDP wrapper, ...), or None."""
    for module in model.modules():
        if hasattr(module, "pop_expert_load"):
            return module
    return None


def plot_expert_load(load_LE: torch.Tensor, path: str | Path, title: str = "Tokens per expert") -> Path:
    """Save a layers x experts heatmap of the share of each layer's tokens that went to each expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = (load_LE.double() / load_LE.sum(dim=-1, keepdim=True).clamp_min(1)).cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * share.shape[1] + 2), max(2.5, 0.4 * share.shape[0] + 1.5)))
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of tokens")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class RoutingStatsCallback(TrainerCallback, ExportableState):
    """Adds `moe/max_violation`, `moe/load_entropy` (means over MoE layers) and per-layer values to the Trainer's
    training logs, from the training forward passes since the previous training log (evaluation logs get none); at
    the end of training saves the expert-load heatmap of the whole run to `output_dir/expert_load.png`.

    The run's total travels in each checkpoint's `trainer_state.json` (`ExportableState`), so a run resumed from a
    checkpoint plots every step since the start, not only the resumed ones. (With
    `restore_callback_states_from_checkpoint=True` transformers replaces the callback by a copy at the end of the
    list, after the printer: the values still reach the log history.)

    `Trainer(..., callbacks=[RoutingStatsCallback()])` records them in `trainer.state.log_history`; use
    `RoutingStatsCallback.attach(trainer)` to also have them printed and sent to the reporting integrations.
    """

    def __init__(self, per_layer: bool = True):
        self.per_layer = per_layer
        self.total_load: torch.Tensor | None = None  # (num_moe_layers, E) tokens per expert since the run began
        self._since_log: torch.Tensor | None = None  # the same, since the last training log
        self._model: torch.nn.Module | None = None  # the trained model, between train begin and end

    @classmethod
    def attach(cls, trainer, **kwargs) -> "RoutingStatsCallback":
        """Insert the callback first, so that the progress printer and reporters see the added values."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def state(self) -> dict:
        """What a checkpoint keeps (`ExportableState`): the run's expert-load total up to now, as JSON lists. The
        Trainer asks as it writes a checkpoint, whatever triggered the save and wherever this callback sits."""
        if self._model is not None:
            self._collect(self._model)
        total = None if self.total_load is None else self.total_load.tolist()
        return {"args": {"per_layer": self.per_layer}, "attributes": {"total_load": total}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A resumed run's state holds the checkpoint's total (a fresh run's: this callback's own, as built). A
        # checkpoint written before llama4x kept it has none: count from the resumed step, and give the Trainer the
        # entry it updates at its next save.
        empty = {"args": {"per_layer": self.per_layer}, "attributes": {"total_load": None}}
        saved = state.stateful_callbacks.setdefault(type(self).__name__, empty)
        saved = saved[0] if isinstance(saved, list) else saved
        total = saved["attributes"]["total_load"]
        self.total_load = None if total is None else torch.as_tensor(total)
        self._since_log, self._model = None, model

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation results, the end-of-training summary
            return
        self._collect(model)
        load_LE, self._since_log = self._since_log, None
        if load_LE is None:
            return
        stats = routing_stats(load_LE)
        values = {
            "moe/max_violation": stats["max_violation"].mean().item(),
            "moe/load_entropy": stats["load_entropy"].mean().item(),
        }
        if self.per_layer:
            for i, (violation, entropy) in enumerate(zip(stats["max_violation"], stats["load_entropy"])):
                values[f"moe/max_violation/layer_{i}"] = violation.item()
                values[f"moe/load_entropy/layer_{i}"] = entropy.item()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)  # the steps after the last training log
        self._model = None
        if self.total_load is not None and state.is_world_process_zero:
            plot_expert_load(
                self.total_load, Path(args.output_dir) / "expert_load.png", "Tokens per expert (training)"
            )

    def _collect(self, model) -> None:
        """Move the tokens per expert `(num_moe_layers, E)` of the training forward passes since the last call from
        the model into the since-last-log and whole-run totals."""
        text_model = find_text_model(model) if model is not None else None
        load_LE = text_model.pop_expert_load() if text_model is not None else None
        if load_LE is None or load_LE.sum() == 0:
            return
        load_LE = load_LE.cpu()
        self._since_log = load_LE if self._since_log is None else self._since_log + load_LE
        self.total_load = load_LE if self.total_load is None else self.total_load + load_LE
