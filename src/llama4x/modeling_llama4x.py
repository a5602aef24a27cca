"""llama4x text decoder: iRoPE attention (chunked RoPE layers + global NoPE layers), MoE / dense FFNs, LM head.

Shapes: B batch, S query length, L key length, nH query heads, nKV key/value heads, D head_dim, H hidden size.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ._compat import CACHE_FIELD, PACKED_CHUNKED_MASKS
from .balancing import (
    all_reduce_load,
    balancing_losses,
    expert_load,
    token_mask_from_attention_mask,
    update_balancing_bias,
    watch_for_bias_updates,
)
from .checkpoints import refuse_pickle_weights, save_staged, verify_safetensors_folder
from .chunked_attention import BlockwiseChunks, blockwise_chunks_for, refuse_packed_sequences
from .configuration_llama4x import Llama4XTextConfig
from .moe import Llama4XExperts, Llama4XMLP, Llama4XMoE, Llama4XRouter
from .validation import check_text_inputs

logger = logging.get_logger(__name__)


@dataclass
class Llama4XModelOutput(MoeModelOutputWithPast):
    """Decoder output. With `output_router_logits`: `router_logits` per MoE layer `(T, E)`, `expert_load`
    `(num_moe_layers, E)` tokens per expert (padding excluded), and the unweighted balancing losses `aux_loss`
    (Switch/GShard) and `z_loss`, which are also computed whenever a loss weighs them in (a non-zero coefficient and
    `balancing_losses` not False; the LM heads pass whether labels were given, so `generate` skips them)."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None


@dataclass
class Llama4XCausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` = LM loss + `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss` when labels are given."""

    z_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None


class Llama4XRMSNorm(nn.Module):
    """RMSNorm computed in float32; without `weight` it is Llama 4's weightless QK "L2" norm."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out * self.weight if self.weight is not None else out


class Llama4XRotaryEmbedding(nn.Module):
    """RoPE frequencies from transformers' `ROPE_INIT_FUNCTIONS`, returned as `(cos, sin)` of shape (B, S, D)
    in Llama 4's interleaved-pair layout (dimensions 2i and 2i+1 share a frequency)."""

    def __init__(self, config: Llama4XTextConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: Llama4XTextConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float)  # (B, S, D/2)
        freqs = freqs.repeat_interleave(2, dim=-1)  # (B, S, D)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): multiplication by i on interleaved complex pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x (B, S, heads, D)` by `cos, sin (B, S, D)`, in float32 like Llama 4."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x32 = x.float()
    return (x32 * cos + rotate_pairs(x32) * sin).type_as(x)


def keys_seen(position_ids: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Number of keys each query attends to (itself included): position + 1, or its offset in its chunk + 1."""
    return (position_ids % chunk_size if chunk_size is not None else position_ids) + 1


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nKV, L, D) -> (B, nKV * n_rep, L, D)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: `query (B, nH, S, D)`, `key/value (B, nKV, L, D)` -> `(B, S, nH, D)`, weights."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nH, S, L)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class Llama4XAttention(nn.Module):
    """GQA self-attention with RoPE (chunked layers) or NoPE (global layers), QK-norm, Llama 4's temperature
    tuning and Scalable-Softmax, dispatched through `ALL_ATTENTION_FUNCTIONS`."""

    def __init__(self, config: Llama4XTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.use_rope = layer_idx not in config.nope_layers
        self.chunk_size = config.attention_chunk_size if config.layer_types[layer_idx] == "chunked_attention" else None
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.use_qk_norm == "rms":
            self.q_norm = Llama4XRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = Llama4XRMSNorm(self.head_dim, config.rms_norm_eps)
        elif config.use_qk_norm == "l2" and self.use_rope:
            self.qk_norm = Llama4XRMSNorm(self.head_dim, config.rms_norm_eps, elementwise_affine=False)
        if config.use_scalable_softmax:
            self.ssmax_scale = nn.Parameter(torch.full((self.num_heads,), config.scalable_softmax_init))

    def query_scale(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """Per-query (and per-head for SSMax) multiplier of the attention logits, `(B, S, nH or 1, 1)`, or None.
        Padding may carry negative positions (`attention_mask.cumsum(-1) - 1`): it is scaled as position 0, since an
        infinite scale there would make its keys and values NaN, and NaN survives the mask into the real tokens."""
        tuned = self.config.attn_temperature_tuning and not self.use_rope
        if not (tuned or self.config.use_scalable_softmax):
            return None
        position_ids = position_ids.clamp_min(0)
        scale = None
        if tuned:
            floor = torch.floor((position_ids.float() + 1.0) / self.config.floor_scale)
            scale = (1.0 + self.config.attn_scale * torch.log1p(floor))[..., None, None]
        if self.config.use_scalable_softmax:
            log_n = torch.log(keys_seen(position_ids, self.chunk_size).float())[..., None, None]
            ssmax = self.ssmax_scale.float()[:, None] * log_n  # (B, S, nH, 1)
            scale = ssmax if scale is None else scale * ssmax
        return scale

    def rope_and_l2_norm(
        self, query: torch.Tensor, key: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE, then Llama 4's weightless QK norm where configured, on `query (B, S, nH, D)` and `key (B, S, nKV, D)`
        joined along the heads: the same arithmetic per element in half the operators, which is what eager decoding
        pays for (each operator costs microseconds of host time whatever its size)."""
        qk = apply_interleaved_rope(torch.cat((query, key), dim=2), *position_embeddings)  # (B, S, nH + nKV, D)
        if hasattr(self, "qk_norm"):  # Llama 4 normalises after RoPE
            qk = self.qk_norm(qk)
        return qk.split((query.shape[2], key.shape[2]), dim=2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (B, S)
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim)  # (B, S, nH, D)
        key = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim)  # (B, S, nKV, D)
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, nKV, S, D)

        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        if self.use_rope:
            query, key = self.rope_and_l2_norm(query, key, position_embeddings)
        if (scale := self.query_scale(position_ids)) is not None:
            query = (query * scale).to(query.dtype)

        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, nH, S, D), (B, nKV, S, D)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        dropout = self.attention_dropout if self.training else 0.0
        if isinstance(attention_mask, BlockwiseChunks):
            attn_output = attention_mask.attend(self, query, key, value, scaling=self.scaling, dropout=dropout)
            return self.o_proj(attn_output.reshape(*input_shape, -1)), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, S, nH * D)
        return self.o_proj(attn_output), attn_weights


class Llama4XDecoderLayer(GradientCheckpointingLayer):
    """Attention + FFN (MoE or dense SwiGLU), pre-norm or Chameleon's post-norm, optional residual dropout."""

    def __init__(self, config: Llama4XTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.pre_norm = config.norm_placement == "pre"
        self.self_attn = Llama4XAttention(config, layer_idx)
        self.is_moe_layer = layer_idx in config.moe_layers
        if self.is_moe_layer:
            self.feed_forward = Llama4XMoE(config)
        else:
            self.feed_forward = Llama4XMLP(config, config.intermediate_size)
        self.input_layernorm = Llama4XRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Llama4XRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns `(hidden_states (B, S, H), router_logits (T, E), topk_index (T, K))`, routing None if dense."""
        attn_in = self.input_layernorm(hidden_states) if self.pre_norm else hidden_states
        attn_out, _ = self.self_attn(attn_in, position_embeddings, position_ids, attention_mask, cache, **kwargs)
        if not self.pre_norm:
            attn_out = self.input_layernorm(attn_out)
        hidden_states = hidden_states + self.residual_dropout(attn_out)

        ffn_in = self.post_attention_layernorm(hidden_states) if self.pre_norm else hidden_states
        router_logits = topk_index = None
        if self.is_moe_layer:
            ffn_out, router_logits, topk_index = self.feed_forward(ffn_in)
        else:
            ffn_out = self.feed_forward(ffn_in)
        if not self.pre_norm:
            ffn_out = self.post_attention_layernorm(ffn_out)
        return hidden_states + self.residual_dropout(ffn_out), router_logits, topk_index


def dense_attention_masks(
    config,
    inputs_embeds,
    attention_mask,
    cache,
    position_ids,
    kinds,
    cache_layer_of_kind: dict[str, int] | None = None,
) -> dict:
    """transformers' masks for the given layer types ("full_attention": causal, "chunked_attention": chunked), each
    sized from the cache of `cache_layer_of_kind[kind]` (default: the first layer of that type)."""
    makers = {"full_attention": create_causal_mask, "chunked_attention": create_chunked_causal_mask}
    layer_of_kind = cache_layer_of_kind or {}
    return {
        kind: makers[kind](
            config, inputs_embeds, attention_mask, cache, position_ids=position_ids, layer_idx=layer_of_kind.get(kind)
        )
        for kind in kinds
    }


class Llama4XPreTrainedModel(PreTrainedModel):
    config_class = Llama4XTextConfig
    config: Llama4XTextConfig
    base_model_prefix = "model"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Llama4XDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False  # chunked attention needs a mask flash-attn cannot express
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _supports_pipeline_stages = True  # transformers' pipeline parallelism (`pp_size`), which needs `base_model.layers`
    # The balancing bias moves in steps of ~1e-3 that bfloat16 cannot represent around its typical values.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _can_record_outputs = {
        "hidden_states": Llama4XDecoderLayer,
        "attentions": Llama4XAttention,
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for `@use_experts_implementation` in the model's own file; ours is in moe.py.
        return True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Llama4XExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Llama4XMoE) and module.e_score_correction_bias is not None:
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, Llama4XAttention) and hasattr(module, "ssmax_scale"):
            init.constant_(module.ssmax_scale, self.config.scalable_softmax_init)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, position_ids=None, **kwargs):
        """The per-layer-type masks `generate` prepares for compilable (static) caches, for the decoding steps. The
        prefill (an empty cache) gets the 2D mask back: the decoder builds its own masks then, and computes chunked
        layers blockwise under SDPA instead of through an (S, S) mask. transformers 5.17's generic version passes
        `block_sequence_ids` to its chunked-mask function, which does not take it."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() == 0:
            return attention_mask
        kinds = set(config.layer_types)
        return dense_attention_masks(config, inputs_embeds, attention_mask, cache, position_ids, kinds)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, reading safetensors only unless `use_safetensors=False` is passed (pickled
        weights can run code), after checking a local folder's shards (a truncated or missing file is named)."""
        stages = getattr(kwargs.get("distributed_config"), "pp_size", None) or 1
        if stages > 1 and not cls._supports_pipeline_stages:
            raise ValueError(
                f"`DistributedConfig(pp_size={stages})`: transformers' pipeline splits a decoder's `layers`, and "
                f"{cls.__name__} keeps its decoder behind the vision front-end. Load the text model "
                "(`Llama4XForCausalLM`) for pipeline stages, or split this one with `tp_size` / `ep_size`."
            )
        safetensors_only = kwargs.get("use_safetensors") is not False
        if pretrained_model_name_or_path is not None:  # None: the weights come as `state_dict=`
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            if safetensors_only:
                refuse_pickle_weights(folder)
            verify_safetensors_folder(folder)
        if safetensors_only:
            kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """transformers' `save_pretrained`, staged (`checkpoints.save_staged`): an interrupted save leaves the folder
        as it was or refusing to load, never mixing new and old weights. (Not staged when pushing to the hub.) A config
        that changed since it was built (`resize_token_embeddings` below a special token id) is validated first: no
        folder is written that would not load."""
        for config in (self.config, *(getattr(self.config, name) for name in self.config.sub_configs)):
            try:
                config._validate()
            except ValueError as error:
                raise ValueError(f"Not saved to {save_directory}: {error}") from error
        if not is_main_process or kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, is_main_process, *args, **kwargs)

        def save(staging):
            super(Llama4XPreTrainedModel, self).save_pretrained(staging, is_main_process, *args, **kwargs)

        save_staged(save, save_directory, kwargs.get("variant"))

    def get_compiled_call(self, compile_config):
        # transformers returns the uncompiled call for every model_type containing "llama4" (which "llama4x" does);
        # llama4x's attention and MoE compile, so compiled decoding with a static cache stays available.
        compile_config = compile_config or self._default_compile_config()
        if getattr(self, "_llama4x_compile_config", None) != compile_config:
            self._llama4x_compile_config = compile_config
            self._compiled_call = torch.compile(self.__call__, **compile_config.to_dict())
        return self._compiled_call


class Llama4XTextModel(Llama4XPreTrainedModel):
    """Token embeddings, decoder layers and the final norm."""

    def __init__(self, config: Llama4XTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Llama4XDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Llama4XRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Llama4XRotaryEmbedding(config)
        self.gradient_checkpointing = False
        # Tokens per expert seen in training forward passes, `(2, num_moe_layers, E)` int64, created on first use:
        # [0] since the last bias update, [1] since the last `pop_expert_load()` (for logging). One tensor, updated
        # in place: a compiled forward may not mutate two tensors it created as each other's aliases.
        self._expert_load_totals: torch.Tensor | None = None
        watch_for_bias_updates(self)  # each optimizer step applies the bias update from the pending loads
        self.post_init()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        watch_for_bias_updates(self)  # copies (`copy.deepcopy`, unpickling) are trained too

    @property
    def moe_blocks(self) -> list[Llama4XMoE]:
        return [layer.feed_forward for layer in self.layers if layer.is_moe_layer]

    def router_weights(self) -> list[nn.Parameter]:
        """The routers' own weights; none of a router that PEFT replaced by a trained copy (`modules_to_save`)."""
        return [block.router.weight for block in self.moe_blocks if isinstance(block.router, Llama4XRouter)]

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        past_key_values: Cache | None = None,
        balancing_losses: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Llama4XModelOutput:
        """Decoder forward. `cache` (`past_key_values` before transformers 5.24) holds the keys and values of
        earlier steps; chunked layers keep at most one chunk of them. `balancing_losses=False` skips the weighted
        balancing losses when nothing will add them to a loss (default: computed when a coefficient is non-zero)."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        local_layers = self._local_layers()
        past_seen = cache.get_seq_length(local_layers[0] if local_layers else 0) if cache is not None else 0
        check_text_inputs(self.config, input_ids, inputs_embeds, attention_mask, position_ids, past_seen)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, S, H)
        masks = attention_mask
        if not isinstance(masks, dict):  # `generate` may have prepared them already
            # The caller's position ids only: they may mark packed sequences, the default ones cannot.
            masks = self._attention_masks(inputs_embeds, attention_mask, cache, position_ids, past_seen, local_layers)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)  # (1, S)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        router_logits, topk_indices = [], []
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            outputs = layer(
                hidden_states,
                position_embeddings,
                position_ids,
                attention_mask=masks[layer_type],
                cache=cache,
                **kwargs,
            )
            if isinstance(outputs, torch.Tensor):  # a layer of another pipeline stage: transformers' identity
                hidden_states = outputs
                continue
            hidden_states, layer_logits, layer_topk = outputs
            if layer_logits is not None:
                router_logits.append(layer_logits)
                topk_indices.append(layer_topk)
        hidden_states = self.norm(hidden_states)

        output = Llama4XModelOutput(last_hidden_state=hidden_states, **{CACHE_FIELD: cache if use_cache else None})
        if router_logits:
            self._report_routing(output, router_logits, topk_indices, attention_mask, inputs_embeds.shape[:2],
                                 bool(output_router_logits), balancing_losses is not False)  # fmt: skip
        return output

    def _local_layers(self) -> list[int]:
        """The layers this process runs: all, except on a stage of transformers' pipeline parallelism, where the
        other stages' layers are identities whose caches stay empty (so positions and masks come from these)."""
        return [index for index, layer in enumerate(self.layers) if isinstance(layer, Llama4XDecoderLayer)]

    def _attention_masks(
        self, inputs_embeds, attention_mask, cache, position_ids, past_seen, local_layers: list[int] | None = None
    ) -> dict:
        """One mask per layer type, sized from the cache of the first local layer of that type (`local_layers`:
        default all). Chunked layers under SDPA skip their dense (S, S) mask when they can be computed blockwise
        (see `chunked_attention.py`)."""
        kinds = set(self.config.layer_types)
        if local_layers is None:
            local_layers = list(range(len(self.config.layer_types)))
        local_layer_of_kind: dict[str, int] = {}
        for index in local_layers:
            local_layer_of_kind.setdefault(self.config.layer_types[index], index)
        if "chunked_attention" not in kinds:
            return dense_attention_masks(
                self.config, inputs_embeds, attention_mask, cache, position_ids, kinds, local_layer_of_kind
            )
        seq_len, chunk = inputs_embeds.shape[1], self.config.attention_chunk_size
        if past_seen + seq_len <= chunk and not getattr(cache, "is_compileable", False):
            # Everything seen so far fits in the first chunk: chunked attention is plain causal attention, and
            # both cache kinds hold the same keys, so the causal mask (often none at all under SDPA) serves both.
            any_local_layer = {"full_attention": local_layers[0] if local_layers else 0}
            masks = dense_attention_masks(
                self.config, inputs_embeds, attention_mask, cache, position_ids, {"full_attention"}, any_local_layer
            )
            return {"full_attention": masks["full_attention"], "chunked_attention": masks["full_attention"]}
        # transformers' masks keep packed sequences apart (position ids restarting in a row) only without a cache
        packed_position_ids = position_ids if cache is None else None
        if packed_position_ids is not None and attention_mask is None and not PACKED_CHUNKED_MASKS:
            refuse_packed_sequences(packed_position_ids)
        masks = {}
        if self.config._attn_implementation == "sdpa":
            blockwise = blockwise_chunks_for(attention_mask, packed_position_ids, seq_len, past_seen, chunk)
            if blockwise is not None:
                masks["chunked_attention"] = blockwise
        kinds -= set(masks)
        return {
            **masks,
            **dense_attention_masks(
                self.config, inputs_embeds, attention_mask, cache, position_ids, kinds, local_layer_of_kind
            ),
        }

    def _report_routing(
        self, output, router_logits, topk_indices, attention_mask, batch_shape, requested, loss_wanted
    ) -> None:
        """Expert loads, balancing losses and bias bookkeeping from the MoE layers' routing."""
        config = self.config
        tracking = self.training and torch.is_grad_enabled()
        weighted = config.router_aux_loss_coef > 0 or config.router_z_loss_coef > 0
        losses = requested or (weighted and loss_wanted)
        if not (requested or tracking or losses):  # plain inference: nothing to compute
            return
        token_mask_BS = token_mask_from_attention_mask(attention_mask, batch_shape[1])
        if token_mask_BS is None:
            token_mask_BS = torch.ones(batch_shape, dtype=torch.bool, device=router_logits[0].device)
        if requested or tracking:
            load_LE = torch.stack([expert_load(ix, config.num_local_experts, token_mask_BS) for ix in topk_indices])
            if tracking:
                self._track_expert_load(load_LE)
            if requested:
                output.expert_load = load_LE
                output.router_logits = tuple(router_logits)
        if losses:
            output.aux_loss, output.z_loss = balancing_losses(router_logits, topk_indices, token_mask_BS, config)

    def _track_expert_load(self, load_LE: torch.Tensor) -> None:
        totals = self._expert_load_totals
        if totals is None or totals.device != load_LE.device:
            totals = self._expert_load_totals = load_LE.new_zeros((2, *load_LE.shape))
        totals += load_LE.detach()

    def apply_balancing_bias_update(self) -> None:
        """One auxiliary-loss-free balancing step from the loads since the last one (called after each optimizer
        step automatically; see `balancing.py`)."""
        if self._expert_load_totals is None:
            return
        if self.moe_blocks[0].e_score_correction_bias is None:
            raise ValueError(
                f"`router_bias_update_rate`={self.config.router_bias_update_rate} was set after this model was built "
                "without the balancing bias; set it when building or loading the model (`from_pretrained(..., "
                "router_bias_update_rate=...)`)."
            )
        pending_LE = self._expert_load_totals[0]
        load_LE = all_reduce_load(pending_LE.clone())
        for block, load_E in zip(self.moe_blocks, load_LE):
            update_balancing_bias(block.e_score_correction_bias, load_E, self.config.router_bias_update_rate)
        pending_LE.zero_()

    def drop_pending_loads(self) -> None:
        """Forget the loads counted since the last bias update (an optimizer step that left the routers frozen)."""
        if self._expert_load_totals is not None:
            self._expert_load_totals[0].zero_()

    def pop_expert_load(self) -> torch.Tensor | None:
        """Tokens per expert `(num_moe_layers, E)` over the training forward passes since the last call."""
        if self._expert_load_totals is None:
            return None
        window_LE = self._expert_load_totals[1]
        load_LE = window_LE.clone()
        window_LE.zero_()
        return load_LE


def causal_lm_loss(
    loss_function: Callable,
    logits: torch.Tensor,
    labels: torch.LongTensor,
    outputs: Llama4XModelOutput,
    config: Llama4XTextConfig,
    **kwargs,
) -> torch.Tensor:
    """The LM loss (`loss_function`: shifted cross-entropy, -100 ignored) plus the balancing losses the config weights
    in, `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`. Shared by every llama4x LM head."""
    loss = loss_function(logits=logits, labels=labels, vocab_size=config.vocab_size, **kwargs)
    if config.router_aux_loss_coef > 0 and outputs.aux_loss is not None:
        loss = loss + config.router_aux_loss_coef * outputs.aux_loss.to(loss.device)
    if config.router_z_loss_coef > 0 and outputs.z_loss is not None:
        loss = loss + config.router_z_loss_coef * outputs.z_loss.to(loss.device)
    return loss


class Llama4XForCausalLM(Llama4XPreTrainedModel, GenerationMixin):
    """The text decoder with a language-modelling head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: Llama4XTextConfig):
        super().__init__(config)
        self.model = Llama4XTextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Llama4XCausalLMOutput:
        """`labels (B, S)` are the input ids (shifted inside; -100 ignored); `logits_to_keep` keeps the last N
        positions' logits (0: all)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            balancing_losses=labels is not None,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, S_kept, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(self.loss_function, logits, labels, outputs, self.config, **kwargs)
        return Llama4XCausalLMOutput(
            loss=loss,
            aux_loss=outputs.aux_loss,
            z_loss=outputs.z_loss,
            expert_load=outputs.expert_load,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
