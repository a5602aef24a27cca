"""LoRA for llama4x with PEFT: a `LoraConfig` built from the model's actual module names.

Parts, each selectable on its own:

    attention        `self_attn.{q,k,v,o}_proj` of every decoder layer            (LoRA, `target_modules`)
    shared_experts   `feed_forward.shared_experts.{gate,up,down}_proj` of MoE layers (LoRA, `target_modules`)
    dense_ffn        `feed_forward.{gate,up,down}_proj` of the dense (non-MoE) layers (LoRA, `target_modules`)
    routed_experts   the stacked `feed_forward.experts.gate_up_proj (E, 2I, H)` and `down_proj (E, H, I)`
                     (LoRA per expert through PEFT's `target_parameters`: rank r for each of the E experts)
    router           `feed_forward.router` (trained in full through `modules_to_save`, see below)

The dense FFN and the shared experts both have `gate_proj/up_proj/down_proj`; `target_modules` is a regex over the
full module names, so each part reaches only its own layers.

The router is trained in full (`modules_to_save`) rather than with LoRA: it is tiny (`E x H`), so a rank-r adapter
would save at most a factor `E / r`, and its logits stay a float32 linear map of the exact trained weights.

    model = AutoModelForCausalLM.from_pretrained(...)
    peft_model = get_peft_model(model, llama4x.lora_config(model, parts=("attention", "routed_experts"), r=8))
"""

import re
from collections.abc import Iterable

from peft import LoraConfig, PeftModel
from torch import nn
from transformers.utils import logging

from .modeling_llama4x import Llama4XDecoderLayer

logger = logging.get_logger(__name__)

LORA_PARTS = ("attention", "shared_experts", "dense_ffn", "routed_experts", "router")
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_DENSE_FFN = ("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")
_SHARED = tuple(f"feed_forward.shared_experts.{proj}" for proj in ("gate_proj", "up_proj", "down_proj"))
_EXPERT_PARAMETERS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")


def _decoder_layers(model: nn.Module) -> list[tuple[str, Llama4XDecoderLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Llama4XDecoderLayer)]


def _as_tuple(parts: Iterable[str] | str) -> tuple[str, ...]:
    return (parts,) if isinstance(parts, str) else tuple(parts)  # one part may be given as a plain string


def lora_targets(model: nn.Module, parts: Iterable[str] | str = LORA_PARTS) -> dict[str, list[tuple[str, str]]]:
    """For each requested part, the `(layer_name, path_in_layer)` pairs it reaches in `model` (possibly none: a
    model whose layers are all MoE has no dense FFN)."""
    parts = _as_tuple(parts)
    unknown = [part for part in parts if part not in LORA_PARTS]
    if unknown or not parts:
        raise ValueError(f"Invalid LoRA `parts`={parts!r}: expected a non-empty selection from {LORA_PARTS}.")
    if isinstance(model, PeftModel):
        raise TypeError("lora_config expects the base model, not a PeftModel (module names would not match).")
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no llama4x decoder layer to adapt.")
    targets: dict[str, list[tuple[str, str]]] = {part: [] for part in parts}
    for name, layer in layers:
        moe = layer.is_moe_layer
        paths = {
            "attention": _ATTENTION,
            "dense_ffn": () if moe else _DENSE_FFN,
            "shared_experts": _SHARED if moe and layer.feed_forward.shared_experts is not None else (),
            "routed_experts": _EXPERT_PARAMETERS if moe else (),
            "router": ("feed_forward.router",) if moe else (),
        }
        for part in parts:
            targets[part].extend((name, path) for path in paths[part])
    return targets


def _names_regex(pairs: list[tuple[str, str]]) -> str:
    """A compact regex that `re.fullmatch`es exactly the module names `f"{layer_name}.{path}"` of `pairs`:
    `prefix\\.(?:0|1|...)\\.(?:path_a|path_b)` per group of layers sharing the same paths."""
    paths_by_layer: dict[tuple[str, str], list[str]] = {}
    for layer_name, path in pairs:
        prefix, _, index = layer_name.rpartition(".")
        paths_by_layer.setdefault((prefix, index), []).append(path)
    layers_by_paths: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (prefix, index), paths in paths_by_layer.items():
        layers_by_paths.setdefault((prefix, tuple(sorted(paths))), []).append(index)
    alternatives = []
    for (prefix, paths), indices in layers_by_paths.items():
        head = f"{re.escape(prefix)}\\." if prefix else ""
        path_alt = "|".join(re.escape(path) for path in paths)
        alternatives.append(f"{head}(?:{'|'.join(indices)})\\.(?:{path_alt})")
    return "|".join(f"(?:{alt})" for alt in alternatives)


def _check_routed_expert_options(dropout: float, kwargs: dict) -> None:
    """Refuse what PEFT's LoRA on the stacked expert weights (`target_parameters`) cannot do: dropout, DoRA, and any
    initialisation but the default and "gaussian" (PiSSA, OLoRA, ... read a `weight` the experts module does not
    have; PEFT would fail only when wrapping or initialising the model, some with an AttributeError)."""
    init = kwargs.get("init_lora_weights", True)
    refused = {
        "dropout": (dropout, dropout > 0, "dropout=0"),
        "use_dora": (kwargs.get("use_dora"), bool(kwargs.get("use_dora")), "use_dora=False"),
        "init_lora_weights": (
            init,
            isinstance(init, str) and init.lower() != "gaussian",
            "init_lora_weights True, False or 'gaussian'",
        ),
    }
    for field, (value, invalid, supported) in refused.items():
        if invalid:
            raise ValueError(
                f"Invalid LoRA `{field}`={value!r} with part 'routed_experts': PEFT's LoRA on the stacked expert "
                f"weights (target_parameters) supports only {supported}; use that or leave 'routed_experts' out."
            )


def lora_config(
    model: nn.Module,
    parts: Iterable[str] | str = LORA_PARTS,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    **kwargs,
) -> LoraConfig:
    """A PEFT `LoraConfig` (task type CAUSAL_LM) that adapts the chosen `parts` of `model`'s llama4x decoder layers.

    Args:
        model: the model to adapt (`Llama4XForCausalLM`, or any model that contains llama4x decoder layers).
        parts: any of `LORA_PARTS`; parts with nothing to adapt in this model (e.g. `dense_ffn` when every layer is
            MoE) are skipped.
        r, alpha, dropout: LoRA rank, `lora_alpha` and `lora_dropout`. PEFT's parameter LoRA (the routed experts)
            cannot apply dropout, so `dropout > 0` requires leaving `routed_experts` out.
        **kwargs: further `LoraConfig` fields (`use_rslora`, `init_lora_weights`, extra `modules_to_save`, ...);
            with `routed_experts`, no `use_dora` and `init_lora_weights` only True, False or "gaussian".
    """
    for peft_name, name in (("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
        if peft_name in kwargs:
            raise ValueError(f"Pass LoRA `{peft_name}` as `{name}=` to lora_config.")
    parts = _as_tuple(parts)
    targets = lora_targets(model, parts)
    if targets.get("routed_experts"):
        _check_routed_expert_options(dropout, kwargs)
    module_pairs = [pair for part in ("attention", "shared_experts", "dense_ffn") for pair in targets.get(part, [])]
    expert_paths = sorted({path for _, path in targets.get("routed_experts", [])})
    router = [f"{name}.{path}" for name, path in targets.get("router", [])]
    if not (module_pairs or expert_paths):
        raise ValueError(
            f"LoRA `parts`={parts!r} reach no LoRA target in {type(model).__name__} (PEFT needs one besides "
            "the fully trained router): add 'attention', 'routed_experts', ..."
        )
    skipped = [part for part, pairs in targets.items() if not pairs]
    if skipped:
        logger.info(f"LoRA parts with nothing to adapt in this model, skipped: {skipped}")
    modules_to_save = list(kwargs.pop("modules_to_save", None) or []) + router
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # A regex string is `re.fullmatch`ed against full module names, so dense FFNs and shared experts stay apart.
        target_modules=_names_regex(module_pairs) if module_pairs else [],
        # PEFT matches parameter names by suffix; the decoder is the only module with `feed_forward.experts`.
        target_parameters=expert_paths or None,
        modules_to_save=modules_to_save or None,
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        **kwargs,
    )
