"""Dense students of a llama4x MoE teacher: their configs (`student_config`) and their initialisation from the
teacher's weights (`init_student_from_teacher`).

Shapes: E routed experts, K experts per token, I expert width, H hidden size, D head_dim, T tokens.

Two student kinds share the teacher's tokenizer (same `vocab_size`):

- `"llama4x"`: the same family with every layer dense (`moe_layers=[]`); the kept layers keep their attention kind
  (RoPE + chunked or global NoPE), QK-norm, temperature tuning, and a composite teacher's vision front-end.
- `"llama"`: transformers' `LlamaForCausalLM` (text only), which loads wherever transformers does. It has no NoPE
  layers, chunked attention, QK-norm, temperature tuning or Scalable-Softmax: every layer is a full-attention RoPE
  layer, so weights copied from the teacher start it near, not at, the teacher's function. Its RoPE rotates the halves
  of each head (`rotate_half`) where llama4x rotates interleaved pairs (Llama 4's convention): the copied q/k
  projections are permuted per head (rows `0, 2, 4, ..., 1, 3, 5, ...`) so that each rotated pair meets the same
  frequency; q.k products are unchanged by a permutation applied to both, so on RoPE layers without QK-norm the copied
  attention is exactly the teacher's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.utils import logging

from .configuration_llama4x import Llama4XConfig, Llama4XTextConfig
from .moe import Llama4XMoE, route

logger = logging.get_logger(__name__)

STUDENT_KINDS = ("llama4x", "llama")
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values")


def select_layers(
    num_teacher_layers: int, num_layers: int | None = None, layers: Sequence[int] | None = None
) -> list[int]:
    """The teacher layers a student keeps: `layers` as given (strictly increasing indices), `num_layers` evenly spaced
    ones (`round(i * (L - 1) / (n - 1))`: the first and the last included; n = 1 keeps layer 0), or all of them."""
    L = num_teacher_layers
    if layers is not None:
        layers = [int(i) for i in layers]
        if not layers or any(not 0 <= i < L for i in layers) or any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(
                f"Invalid `layers`={layers!r}: expected strictly increasing teacher layer indices in [0, {L})."
            )
        if num_layers is not None and num_layers != len(layers):
            raise ValueError(f"`num_layers`={num_layers} disagrees with the {len(layers)} `layers`={layers}.")
        return layers
    if num_layers is None:
        return list(range(L))
    if not 1 <= num_layers <= L:
        raise ValueError(f"Invalid `num_layers`={num_layers!r}: expected 1 to {L} (the teacher's depth).")
    if num_layers == 1:
        return [0]
    return [round(i * (L - 1) / (num_layers - 1)) for i in range(num_layers)]


def active_ffn_size(config: Llama4XTextConfig) -> int:
    """The FFN width a token goes through in an MoE layer, `(top-k + shared) * moe_intermediate_size`, or the dense
    `intermediate_size` for a teacher without MoE layers."""
    if not config.moe_layers:
        return config.intermediate_size
    return (config.num_experts_per_tok + config.num_shared_experts) * config.moe_intermediate_size


def student_config(
    teacher_config: Llama4XTextConfig | Llama4XConfig,
    kind: str = "llama4x",
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
) -> Llama4XTextConfig | Llama4XConfig | LlamaConfig:
    """The config of a dense student of `teacher_config` (see the module docstring for the kinds).

    Args:
        teacher_config: a `Llama4XTextConfig`, or a composite `Llama4XConfig` (a `"llama4x"` student then keeps the
            vision config and the image token ids; a `"llama"` student takes the text config only).
        kind: `"llama4x"` or `"llama"`.
        num_layers / layers: the teacher layers kept (see `select_layers`); default all.
        hidden_size: the student width (default the teacher's; a different width rules out copying weights).
        intermediate_size: the dense FFN width (default `active_ffn_size(teacher)`, which lets the FFN be initialised
            from the shared and merged routed experts).

    The kept teacher layers are recorded in the (text) config as `distillation = {"teacher_layers": [...]}`, which
    `init_student_from_teacher` reads.
    """
    if kind not in STUDENT_KINDS:
        raise ValueError(f"Invalid student `kind`={kind!r}: expected one of {STUDENT_KINDS}.")
    composite = isinstance(teacher_config, Llama4XConfig)
    text = teacher_config.text_config if composite else teacher_config
    if not isinstance(text, Llama4XTextConfig):
        raise TypeError(
            f"`teacher_config` must be a Llama4XTextConfig or Llama4XConfig, got {type(teacher_config).__name__}."
        )
    kept = select_layers(text.num_hidden_layers, num_layers, layers)
    width = hidden_size if hidden_size is not None else text.hidden_size
    ffn = intermediate_size if intermediate_size is not None else active_ffn_size(text)
    provenance = {"teacher_layers": kept}
    if kind == "llama":
        return _llama_config(text, kept, width, ffn, provenance)
    fields = text.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "distillation"):
        fields.pop(key, None)
    fields.update(
        num_hidden_layers=len(kept),
        hidden_size=width,
        intermediate_size=ffn,
        moe_layers=[],
        interleave_moe_layer_step=0,
        nope_layers=[i for i, layer in enumerate(kept) if layer in text.nope_layers],
        layer_types=[text.layer_types[layer] for layer in kept],
        output_router_logits=False,
        router_bias_update_rate=0.0,
        distillation=provenance,
    )
    student_text = Llama4XTextConfig(**fields)
    if not composite:
        return student_text
    return Llama4XConfig(
        text_config=student_text,
        vision_config=copy.deepcopy(teacher_config.vision_config),
        image_token_index=teacher_config.image_token_index,
        boi_token_index=teacher_config.boi_token_index,
        eoi_token_index=teacher_config.eoi_token_index,
        tie_word_embeddings=teacher_config.tie_word_embeddings,
    )


def _llama_config(text: Llama4XTextConfig, kept: list[int], width: int, ffn: int, provenance: dict) -> LlamaConfig:
    dropped = [
        name
        for name, present in (
            ("NoPE layers", any(layer in text.nope_layers for layer in kept)),
            ("chunked attention", any(text.layer_types[layer] == "chunked_attention" for layer in kept)),
            (f"QK-norm ({text.use_qk_norm})", text.use_qk_norm != "none"),
            ("attention temperature tuning", text.attn_temperature_tuning and bool(text.nope_layers)),
            ("Scalable-Softmax", text.use_scalable_softmax),
            ("post-norm", text.norm_placement == "post"),
        )
        if present
    ]
    if dropped:
        logger.info(f"llama student: the teacher's {', '.join(dropped)} become plain full-attention RoPE layers.")
    config = LlamaConfig(
        vocab_size=text.vocab_size,
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=len(kept),
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings,
        initializer_range=text.initializer_range,
        rms_norm_eps=text.rms_norm_eps,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
        rope_parameters=copy.deepcopy(text.rope_parameters),
        attention_bias=text.attention_bias,
        attention_dropout=text.attention_dropout,
    )
    config.distillation = provenance
    return config


def text_decoder(model: nn.Module) -> nn.Module:
    """The decoder (embeddings, layers, final norm) of a CausalLM or composite model."""
    base = model.model
    return getattr(base, "language_model", base)


def check_vocab(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Raise a `ValueError` unless teacher and student share the vocabulary size (they must share the tokenizer)."""
    teacher_vocab = teacher.config.get_text_config().vocab_size
    student_vocab = student.config.get_text_config().vocab_size
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"Teacher vocab_size={teacher_vocab} but student vocab_size={student_vocab}: distillation compares "
            "distributions token by token, so the student must use the teacher's tokenizer and vocabulary size."
        )


def interleaved_to_rotate_half(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Permute the rows of a q/k projection `(heads * D, ...)` from llama4x's interleaved RoPE pairs `(2i, 2i+1)` to
    Llama's halves `(i, i + D/2)`: per head, rows `0, 2, ..., D-2, 1, 3, ..., D-1`."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]).to(weight.device)
    return weight.unflatten(0, (-1, head_dim))[:, perm].flatten(0, 1)


@torch.no_grad()
def routing_statistics(teacher: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Per MoE layer of the teacher, on the calibration batches (padding excluded): `counts (E,)`, the number of
    (token, slot) routing pairs that chose each expert, and `weight_sums (E,)`, the sum of their combine weights."""
    decoder = text_decoder(teacher)
    config = decoder.config
    blocks = decoder.moe_blocks
    if not blocks:
        return []
    device = next(teacher.parameters()).device
    stats = [{"counts": torch.zeros(config.num_local_experts, dtype=torch.float64),
              "weight_sums": torch.zeros(config.num_local_experts, dtype=torch.float64)} for _ in blocks]  # fmt: skip
    was_training = teacher.training
    teacher.eval()
    tokens = 0
    for batch in batches:
        inputs = {key: batch[key].to(device) for key in INPUT_KEYS if batch.get(key) is not None}
        outputs = teacher(**inputs, output_router_logits=True)
        mask = inputs.get("attention_mask")
        mask_T = mask.reshape(-1).bool() if mask is not None else None
        for block, logits_TE, layer_stats in zip(blocks, outputs.router_logits, stats):
            bias = block.e_score_correction_bias
            routing = route(logits_TE.float(), config, None if bias is None else bias.float())
            index_TK, weight_TK = routing.topk_index, routing.topk_weight
            if mask_T is not None:
                index_TK, weight_TK = index_TK[mask_T], weight_TK[mask_T]
            layer_stats["counts"].index_add_(
                0, index_TK.reshape(-1).cpu(), torch.ones(index_TK.numel(), dtype=torch.float64)
            )
            layer_stats["weight_sums"].index_add_(0, index_TK.reshape(-1).cpu(), weight_TK.reshape(-1).double().cpu())
        tokens += int(mask_T.sum()) if mask_T is not None else inputs["input_ids"].numel()
    teacher.train(was_training)
    for layer_stats in stats:
        layer_stats["tokens"] = tokens
    return stats


def group_experts(counts_E: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Split the experts into `num_groups` groups of near-equal total use: most-used first, each into the group with
    the smallest total so far (ties: lower index)."""
    order = sorted(range(len(counts_E)), key=lambda e: (-float(counts_E[e]), e))
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    totals = [0.0] * num_groups
    for e in order:
        g = min(range(num_groups), key=lambda i: (totals[i], len(groups[i]), i))
        groups[g].append(e)
        totals[g] += float(counts_E[e])
    return [sorted(group) for group in groups]


def merged_expert_ffn(
    block: Llama4XMoE, stats: dict[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense SwiGLU `(gate (W, H), up (W, H), down (H, W))` of width `W = (shared + K) * I` that stands in for
    an MoE block (see `init_student_from_teacher` for the recipe)."""
    config = block.config
    E, K = config.num_local_experts, config.num_experts_per_tok
    gate_EIH, up_EIH = block.experts.gate_up_proj.detach().double().chunk(2, dim=1)
    down_EHI = block.experts.down_proj.detach().double()
    if stats is None:
        counts_E, mean_weight_E = torch.ones(E, dtype=torch.float64), torch.ones(E, dtype=torch.float64)
    else:
        counts_E = stats["counts"]
        mean_weight_E = torch.where(
            counts_E > 0, stats["weight_sums"] / counts_E.clamp_min(1), torch.ones_like(counts_E)
        )
    gates, ups, downs = [], [], []
    if block.shared_experts is not None:
        shared = block.shared_experts
        gates.append(shared.gate_proj.weight.detach().double())
        ups.append(shared.up_proj.weight.detach().double())
        downs.append(shared.down_proj.weight.detach().double())
    for group in group_experts(counts_E, K):
        index = torch.tensor(group)
        share = counts_E[index]
        share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1.0 / len(group))
        weight = mean_weight_E[index]
        # Llama 4 multiplies the expert's input by the combine weight, other routers its output.
        input_scale, output_scale = (
            (share * weight, share) if config.router_weight_on_input else (share, share * weight)
        )
        gates.append(torch.einsum("e,eih->ih", input_scale, gate_EIH[index].cpu()))
        ups.append(torch.einsum("e,eih->ih", input_scale, up_EIH[index].cpu()))
        downs.append(torch.einsum("e,ehi->hi", output_scale, down_EHI[index].cpu()))
    return torch.cat(gates, 0), torch.cat(ups, 0), torch.cat(downs, 1)


def _copy(target: torch.Tensor, source: torch.Tensor) -> None:
    target.copy_(source.to(target.device, target.dtype))


def _copy_attention(student_attn: nn.Module, teacher_attn: nn.Module, rotate_half: bool, head_dim: int) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for param in ("weight", "bias"):
            source = getattr(getattr(teacher_attn, name), param, None)
            target = getattr(getattr(student_attn, name), param, None)
            if source is None or target is None:
                continue
            if rotate_half and name in ("q_proj", "k_proj"):
                source = interleaved_to_rotate_half(source, head_dim)
            _copy(target, source)
    for name in ("q_norm", "k_norm"):
        if hasattr(teacher_attn, name) and hasattr(student_attn, name):
            _copy(getattr(student_attn, name).weight, getattr(teacher_attn, name).weight)
    if hasattr(teacher_attn, "ssmax_scale") and hasattr(student_attn, "ssmax_scale"):
        _copy(student_attn.ssmax_scale, teacher_attn.ssmax_scale)


def _check_shapes(student_config, teacher_config) -> None:
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        s, t = getattr(student_config, field), getattr(teacher_config, field)
        if s != t:
            raise ValueError(
                f"Cannot initialise the student from the teacher: student {field}={s}, teacher {field}={t} (copying "
                "weights needs equal attention shapes); initialise the student randomly instead."
            )


@torch.no_grad()
def init_student_from_teacher(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    calibration_batches: Iterable[dict[str, torch.Tensor]] | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Copy the teacher's weights into a dense student built from `student_config`; returns what was done.

    Copied: token embeddings, LM head, final norm, and for each student layer i the teacher layer `layers[i]`
    (default: the config's `distillation["teacher_layers"]`, else evenly spaced): attention projections (q/k permuted
    for a `"llama"` student, see the module docstring), QK-norm and Scalable-Softmax weights, both norms; a composite
    teacher's vision front-end and projector into a composite student.

    FFN of a student layer whose teacher layer is dense: copied when the widths match. Of an MoE teacher layer, when
    the student's `intermediate_size` is the active width `(shared + K) * I`:

    1. on the calibration tokens (padding excluded) count `n_e`, the (token, slot) routing pairs that chose expert e,
       and `w_e`, their mean combine weight (routing as the teacher's: scores, top-k, balancing bias, renormalisation,
       scaling); without calibration batches `n_e = w_e = 1`;
    2. split the experts into K groups of near-equal total `n` (most-used first, each into the emptiest group);
    3. merge each group into one SwiGLU of width I, the frequency-weighted average of its experts' weights,
       `W_g = sum_{e in g} n_e / (sum_{e' in g} n_e') * W_e'`, for gate, up and down, where `W_e'` folds `w_e` into
       the expert (gate and up scaled by `w_e` when the router weights the expert input, as Llama 4; down otherwise);
    4. concatenate the shared expert and the K merged experts along the intermediate dimension.

    The dense SwiGLU of the concatenation is `shared(x) + sum_g merged_g(x)`. So a top-1 teacher whose calibration
    tokens all go to one expert with a constant combine weight (e.g. `norm_topk_prob`) is reproduced exactly on the
    tokens routed to that expert. Other widths leave the FFN at its random initialisation (logged).
    """
    check_vocab(student, teacher)
    t_decoder, s_decoder = text_decoder(teacher), text_decoder(student)
    t_config, s_config = t_decoder.config, s_decoder.config
    _check_shapes(s_config, t_config)
    if layers is None:
        layers = getattr(s_config, "distillation", {}).get("teacher_layers")
    kept = select_layers(t_config.num_hidden_layers, s_config.num_hidden_layers, layers)
    rotate_half = s_config.model_type == "llama"
    stats = routing_statistics(teacher, calibration_batches) if calibration_batches is not None else None
    # `stats` follows the layer order; `moe_layers` may list the layers in any order.
    moe_stats = dict(zip(sorted(t_config.moe_layers), stats)) if stats is not None else {}

    _copy(s_decoder.embed_tokens.weight, t_decoder.embed_tokens.weight)
    _copy(s_decoder.norm.weight, t_decoder.norm.weight)
    _copy(student.lm_head.weight, teacher.lm_head.weight)
    ffn_init = []
    for i, j in enumerate(kept):
        s_layer, t_layer = s_decoder.layers[i], t_decoder.layers[j]
        _copy_attention(s_layer.self_attn, t_layer.self_attn, rotate_half, t_config.head_dim)
        _copy(s_layer.input_layernorm.weight, t_layer.input_layernorm.weight)
        _copy(s_layer.post_attention_layernorm.weight, t_layer.post_attention_layernorm.weight)
        s_ffn = s_layer.mlp if rotate_half else s_layer.feed_forward
        t_ffn = t_layer.feed_forward
        if isinstance(t_ffn, Llama4XMoE):
            gate, up, down = merged_expert_ffn(t_ffn, moe_stats.get(j) if stats is not None else None)
            how = "merged experts"
        else:
            gate, up, down = t_ffn.gate_proj.weight, t_ffn.up_proj.weight, t_ffn.down_proj.weight
            how = "copied"
        if gate.shape != s_ffn.gate_proj.weight.shape:
            logger.warning(
                f"Student layer {i}: FFN width {s_ffn.gate_proj.weight.shape[0]} != the teacher layer {j}'s "
                f"{gate.shape[0]}; its FFN keeps its random initialisation."
            )
            how = "random"
        else:
            _copy(s_ffn.gate_proj.weight, gate)
            _copy(s_ffn.up_proj.weight, up)
            _copy(s_ffn.down_proj.weight, down)
        ffn_init.append(how)

    vision = False
    if hasattr(student.model, "vision_model") and hasattr(teacher.model, "vision_model"):
        student.model.vision_model.load_state_dict(teacher.model.vision_model.state_dict())
        student.model.multi_modal_projector.load_state_dict(teacher.model.multi_modal_projector.state_dict())
        vision = True
    return {
        "teacher_layers": kept,
        "ffn_init": ffn_init,
        "vision_copied": vision,
        "calibration_tokens": stats[0]["tokens"] if stats else 0,
        "expert_counts": {j: s["counts"].tolist() for j, s in moe_stats.items()},
    }
