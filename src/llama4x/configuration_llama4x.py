"""Configuration of the llama4x model family: text decoder, composite multimodal config, presets.

Every behaviour of the model is a validated field here. Invalid values or combinations raise
`ValueError` at construction time with a message that names the field, the value and what is accepted.
"""

import copy
import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ATTENTION_LAYER_TYPES = ("chunked_attention", "full_attention")
QK_NORM_TYPES = ("none", "l2", "rms")
ROUTER_SCORE_FUNCS = ("sigmoid", "softmax")
NORM_PLACEMENTS = ("pre", "post")
AUX_LOSS_TYPES = ("global", "sequence")
FUSION_TYPES = ("encoder", "patch")


def _fail(field: str, value: Any, expected: str) -> None:
    raise ValueError(f"Invalid `{field}`={value!r}: expected {expected}.")


def _check_positive(config: PreTrainedConfig, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if value is None or not math.isfinite(value) or value <= 0:
            _fail(field, value, "a positive finite number")


def _check_probability(config: PreTrainedConfig, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if not 0.0 <= value < 1.0:
            _fail(field, value, "a probability in [0, 1)")


def _check_initializer_range(config: PreTrainedConfig) -> None:
    if not (math.isfinite(config.initializer_range) and config.initializer_range >= 0):
        _fail("initializer_range", config.initializer_range, "a finite standard deviation >= 0")


class _ValidatedOverrides:
    """`from_pretrained(folder, field=value)` and `from_dict(d, field=value)` set the fields after the config is
    built and validated (transformers' way): validate again."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result  # (config, unused kwargs) on request
        config._validate()
        return result


def _check_layer_indices(field: str, indices: list[int], num_layers: int) -> None:
    for index in indices:
        if not 0 <= index < num_layers:
            _fail(field, indices, f"layer indices in [0, {num_layers - 1}] (num_hidden_layers={num_layers})")
    if len(set(indices)) != len(indices):
        _fail(field, indices, "layer indices without duplicates")


@strict
class Llama4XTextConfig(_ValidatedOverrides, PreTrainedConfig):
    r"""
    Text decoder of llama4x: an MoE decoder with interleaved RoPE / NoPE attention (iRoPE).

    Attention:
        hidden_size, num_attention_heads, num_key_value_heads (GQA), head_dim (defaults to
        `hidden_size // num_attention_heads`), attention_bias, attention_dropout.
        use_qk_norm: `"none"`, `"l2"` (Llama 4: weightless RMS normalisation of q and k after RoPE, on RoPE
            layers only) or `"rms"` (Chameleon/OLMo/Qwen3: learned per-head RMSNorm of q and k before RoPE, on
            every layer).
        rope_parameters: transformers' RoPE dict (`rope_type` in default/linear/dynamic/yarn/llama3/... and
            `rope_theta`), applied in Llama 4's interleaved-pair convention.
        nope_layers: indices of the layers without positional encoding (global "NoPE" layers). Defaults to
            every `no_rope_layer_interval`-th layer (Llama 4: layers 3, 7, 11, ...); interval 0 means none.
        attention_chunk_size: length of the local chunks that RoPE layers attend within (None: no chunking).
        layer_types: per layer `"chunked_attention"` or `"full_attention"`. Defaults to chunked attention on
            RoPE layers when `attention_chunk_size` is set, full attention elsewhere.
        attn_temperature_tuning, floor_scale, attn_scale: Llama 4's query scaling on NoPE layers,
            `1 + attn_scale * log1p(floor((pos + 1) / floor_scale))`.
        use_scalable_softmax, scalable_softmax_init: Scalable-Softmax; logits are multiplied by `s * log(n)`
            with `s` learned per head (initialised to `scalable_softmax_init`) and `n` the number of keys the
            query sees.
    Feed-forward:
        intermediate_size: SwiGLU width of the dense (non-MoE) layers.
        moe_layers / interleave_moe_layer_step: which layers are MoE (default every step-th, Llama 4 style).
        num_local_experts, num_experts_per_tok, moe_intermediate_size: routed experts, top-k, expert width.
        num_shared_experts: shared experts as one SwiGLU of width `num_shared_experts * moe_intermediate_size`.
        router_score_func: `"sigmoid"` (Llama 4, DeepSeek-V3) or `"softmax"` (Mixtral, Qwen).
        norm_topk_prob: renormalise the chosen scores to sum to 1; routed_scaling_factor: multiply them.
        router_weight_on_input: scale the expert input by the score (Llama 4) instead of its output.
        output_router_logits: return per-layer router logits, expert loads and balancing losses in the output.
    Load balancing (each a switch; they combine):
        router_aux_loss_coef, router_aux_loss_type: Switch/GShard loss `E * sum_i f_i * P_i` over the batch
            (`"global"`) or per sequence and averaged (`"sequence"`, DeepSeek-V3's complementary loss).
        router_z_loss_coef: coefficient of the router z-loss `mean(logsumexp(logits)^2)`.
        router_bias_update_rate: DeepSeek-V3's auxiliary-loss-free balancing; a per-expert bias added to the
            scores for selection only, updated after each optimizer step by `rate * sign(mean_load - load_i)`.
        use_router_selection_bias: whether the MoE layers carry that bias (`e_score_correction_bias`); set
            automatically when the rate is positive, and kept in saved configs, so a checkpoint trained with
            loss-free balancing reloaded with rate 0 keeps its learned bias, frozen.
        n_group, topk_group: group-limited routing; experts form `n_group` groups and only the `topk_group`
            groups with the highest sum of their top-(k / topk_group) scores are eligible.
        router_jitter_noise: multiplicative uniform noise on the router input in training (Switch).
    Block:
        norm_placement: `"pre"` (default) or `"post"` (Chameleon: norm after attention / FFN, before the residual
            add); residual_dropout: dropout after attention and after the FFN.
    """

    model_type = "llama4x_text"
    default_theta = 500000.0  # RoPE base when a config gives `rope_scaling` without `rope_theta` (as Llama 4)
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        # Dense layers and shared experts are plain SwiGLU MLPs; the patterns match whichever exist.
        "layers.*.feed_forward.gate_proj": "colwise",
        "layers.*.feed_forward.up_proj": "colwise",
        "layers.*.feed_forward.down_proj": "rowwise",
        "layers.*.feed_forward.shared_experts.gate_proj": "colwise",
        "layers.*.feed_forward.shared_experts.up_proj": "colwise",
        "layers.*.feed_forward.shared_experts.down_proj": "rowwise",
        "layers.*.feed_forward.experts.gate_up_proj": "packed_colwise",
        "layers.*.feed_forward.experts.down_proj": "rowwise",
        "layers.*.feed_forward.experts": "moe_tp_experts",
    }
    base_model_ep_plan = {
        "layers.*.feed_forward.experts.gate_up_proj": "grouped_gemm",
        "layers.*.feed_forward.experts.down_proj": "grouped_gemm",
        "layers.*.feed_forward.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    # attention
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_qk_norm: str = "l2"
    nope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: list[str] | None = None
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    use_scalable_softmax: bool = False
    scalable_softmax_init: float = 0.43
    # feed-forward / MoE
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 8192
    num_shared_experts: int = 1
    router_score_func: str = "sigmoid"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_weight_on_input: bool = True
    output_router_logits: bool = False
    # load balancing
    router_aux_loss_coef: float = 0.0
    router_aux_loss_type: str = "global"
    router_z_loss_coef: float = 0.0
    router_bias_update_rate: float = 0.0
    use_router_selection_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    router_jitter_noise: float = 0.0
    # block
    norm_placement: str = "pre"
    residual_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads if self.num_attention_heads else None
        if self.rope_parameters is None and "rope_scaling" not in kwargs and "rope_theta" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
        if self.nope_layers is None:
            interval = self.no_rope_layer_interval
            self.nope_layers = (
                [i for i in range(self.num_hidden_layers) if (i + 1) % interval == 0] if interval > 0 else []
            )
        if self.layer_types is None:
            chunked = self.attention_chunk_size is not None
            self.layer_types = [
                "chunked_attention" if chunked and i not in self.nope_layers else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        if self.router_bias_update_rate > 0:
            self.use_router_selection_bias = True
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, self.num_hidden_layers, step)) if step > 0 else []
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        _check_positive(
            self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "rms_norm_eps", "floor_scale", "routed_scaling_factor",
        )  # fmt: skip
        if self.num_attention_heads % self.num_key_value_heads != 0:
            _fail(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"a divisor of num_attention_heads={self.num_attention_heads}",
            )
        if self.head_dim % 2 != 0:
            _fail("head_dim", self.head_dim, "an even number (RoPE rotates pairs of dimensions)")
        _check_probability(self, "attention_dropout", "residual_dropout")
        if self.hidden_act not in ACT2FN:
            _fail("hidden_act", self.hidden_act, "an activation name known to transformers' ACT2FN")
        if self.use_qk_norm not in QK_NORM_TYPES:
            _fail("use_qk_norm", self.use_qk_norm, f"one of {QK_NORM_TYPES}")
        if self.norm_placement not in NORM_PLACEMENTS:
            _fail("norm_placement", self.norm_placement, f"one of {NORM_PLACEMENTS}")
        if self.router_score_func not in ROUTER_SCORE_FUNCS:
            _fail("router_score_func", self.router_score_func, f"one of {ROUTER_SCORE_FUNCS}")
        if self.no_rope_layer_interval < 0:
            _fail("no_rope_layer_interval", self.no_rope_layer_interval, "0 (no NoPE layers) or a positive interval")
        if self.interleave_moe_layer_step < 0:
            _fail("interleave_moe_layer_step", self.interleave_moe_layer_step, "0 (no MoE layers) or a positive step")
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            _fail("attention_chunk_size", self.attention_chunk_size, "a positive number of tokens or None")
        self._validate_layer_types()
        self._validate_rope()
        _check_layer_indices("nope_layers", self.nope_layers, self.num_hidden_layers)
        _check_layer_indices("moe_layers", self.moe_layers, self.num_hidden_layers)
        if self.moe_layers:
            _check_positive(self, "num_local_experts", "moe_intermediate_size")
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                _fail(
                    "num_experts_per_tok",
                    self.num_experts_per_tok,
                    f"a top-k between 1 and num_local_experts={self.num_local_experts}",
                )
            if self.num_shared_experts < 0:
                _fail("num_shared_experts", self.num_shared_experts, "a count >= 0")
            self._validate_balancing()
        if len(self.moe_layers) < self.num_hidden_layers:
            _check_positive(self, "intermediate_size")
        if self.use_scalable_softmax:
            _check_positive(self, "scalable_softmax_init")
        if not math.isfinite(self.attn_scale):
            _fail("attn_scale", self.attn_scale, "a finite number")
        _check_initializer_range(self)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            _fail("pad_token_id", self.pad_token_id, f"a token id in [0, vocab_size={self.vocab_size}) or None")

    def _validate_balancing(self) -> None:
        for field in ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate"):
            if not (math.isfinite(getattr(self, field)) and getattr(self, field) >= 0):
                _fail(field, getattr(self, field), "a finite coefficient >= 0")
        if self.router_aux_loss_type not in AUX_LOSS_TYPES:
            _fail("router_aux_loss_type", self.router_aux_loss_type, f"one of {AUX_LOSS_TYPES}")
        _check_probability(self, "router_jitter_noise")
        num_experts, n_group, k = self.num_local_experts, self.n_group, self.num_experts_per_tok
        if n_group < 1 or num_experts % n_group != 0:
            _fail("n_group", n_group, f"a divisor of num_local_experts={num_experts}")
        if not 1 <= self.topk_group <= n_group:
            _fail("topk_group", self.topk_group, f"a number of groups between 1 and n_group={n_group}")
        if n_group > 1 and (k % self.topk_group != 0 or k // self.topk_group > num_experts // n_group):
            _fail(
                "topk_group",
                self.topk_group,
                f"a divisor of num_experts_per_tok={k} leaving at most {num_experts // n_group} experts per group",
            )

    def _validate_layer_types(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            _fail("layer_types", self.layer_types, f"one entry per layer (num_hidden_layers={self.num_hidden_layers})")
        for layer_type in self.layer_types:
            if layer_type not in ATTENTION_LAYER_TYPES:
                _fail("layer_types", layer_type, f"entries in {ATTENTION_LAYER_TYPES}")
        if "chunked_attention" in self.layer_types and self.attention_chunk_size is None:
            _fail("attention_chunk_size", None, "a chunk size, since `layer_types` contains 'chunked_attention'")

    def _validate_rope(self) -> None:
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            _fail("rope_parameters['rope_type']", rope_type, f"'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}")
        theta = self.rope_parameters.get("rope_theta")
        if theta is None or not math.isfinite(theta) or theta <= 0:
            _fail("rope_parameters['rope_theta']", theta, "a positive finite base")
        try:
            self.validate_rope()  # transformers' checks of each RoPE type's keys
        except KeyError as error:  # which it reports as a KeyError
            _fail("rope_parameters", self.rope_parameters, f"the keys of rope_type {rope_type!r} ({error.args[0]})")

    @property
    def has_router_selection_bias(self) -> bool:
        """Whether MoE layers carry the balancing bias (also when the rate was set after construction)."""
        return self.use_router_selection_bias or self.router_bias_update_rate > 0

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Llama4XTextConfig":
        """The text config of a named preset (`"tiny"`, `"scout"`, `"maverick"`), with fields overridden."""
        if name not in TEXT_PRESETS:
            raise ValueError(f"Unknown preset {name!r}: expected one of {sorted(TEXT_PRESETS)}.")
        return cls(**{**copy.deepcopy(TEXT_PRESETS[name]), **overrides})


@strict
class Llama4XVisionConfig(_ValidatedOverrides, PreTrainedConfig):
    r"""
    Vision front-end of llama4x: how an image tile becomes a run of embeddings in the decoder's input sequence.

    fusion: `"encoder"` (Llama 4 / MetaCLIP-style ViT: unfold patch embedding, class token, learned positions, pre-norm
        layers with 2-D RoPE, pixel shuffle, MLP adapter) or `"patch"` (Fuyu-style: the raw pixels of each patch go
        straight to the projector; no encoder). The multimodal projector (a linear map into the text hidden size)
        follows either.
    Both:
        image_size: side of a (square) tile in pixels; patch_size: side of a patch; num_channels: colour channels.
    `"encoder"` only (ignored, and not validated, for `"patch"`):
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, norm_eps (LayerNorm),
        attention_dropout: the ViT layers; attention is bidirectional.
        rope_theta: base of the 2-D rotary embedding (half of each head's pairs rotate with the patch column, half
            with the row; the class token is not rotated).
        pixel_shuffle_ratio: the adapter merges each `(1/r) x (1/r)` block of patches into one token of width
            `hidden_size / r**2`, so a tile gives `(image_size / patch_size)**2 * r**2` tokens.
        projector_input_dim, projector_output_dim: widths of the adapter MLP's two layers (`fc1`, `fc2`).
        vision_output_dim: width of the features the multimodal projector receives, i.e. `projector_output_dim`
            (Llama 4 stores both; they must agree).
        initializer_range: std of the normal init of the tower's linear layers.
    """

    model_type = "llama4x_vision"
    base_config_key = "vision_config"

    fusion: str = "encoder"
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    rope_theta: float | int = 10000.0
    initializer_range: float = 0.02
    attention_dropout: float | int = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.fusion not in FUSION_TYPES:
            _fail("fusion", self.fusion, f"one of {FUSION_TYPES}")
        _check_positive(self, "image_size", "patch_size", "num_channels")
        if self.image_size % self.patch_size != 0:
            _fail("patch_size", self.patch_size, f"a divisor of image_size={self.image_size}")
        _check_initializer_range(self)
        if self.fusion == "encoder":
            self._validate_encoder()

    def _validate_encoder(self) -> None:
        _check_positive(
            self, "hidden_size", "num_attention_heads", "intermediate_size", "projector_input_dim",
            "projector_output_dim", "vision_output_dim", "norm_eps", "rope_theta",
        )  # fmt: skip
        if self.num_hidden_layers < 0:
            _fail("num_hidden_layers", self.num_hidden_layers, "a number of layers >= 0")
        if self.hidden_size % self.num_attention_heads != 0:
            _fail("num_attention_heads", self.num_attention_heads, f"a divisor of hidden_size={self.hidden_size}")
        if self.head_dim % 4 != 0:
            _fail(
                "num_attention_heads",
                self.num_attention_heads,
                f"a head count leaving head_dim={self.head_dim} divisible by 4 (2-D RoPE turns pairs along two axes)",
            )
        if self.hidden_act not in ACT2FN:
            _fail("hidden_act", self.hidden_act, "an activation name known to transformers' ACT2FN")
        _check_probability(self, "attention_dropout")
        ratio, side = self.pixel_shuffle_ratio, self.image_size // self.patch_size
        if not 0.0 < ratio <= 1.0:
            _fail("pixel_shuffle_ratio", ratio, "a ratio in (0, 1]")
        # The sizes pixel shuffle reshapes to; each must be a whole number.
        for size in (side * ratio, self.hidden_size / ratio, self.hidden_size / ratio**2):
            if not float(size).is_integer():
                _fail(
                    "pixel_shuffle_ratio",
                    ratio,
                    f"a ratio giving whole sizes for a {side}x{side} patch grid of hidden_size={self.hidden_size}"
                    f" (got {size})",
                )
        if self.vision_output_dim != self.projector_output_dim:
            _fail(
                "vision_output_dim",
                self.vision_output_dim,
                f"projector_output_dim={self.projector_output_dim} (the projector reads the adapter's output)",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per tile, `(image_size / patch_size)**2`."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """Image embeddings (placeholder tokens) per tile: patches after pixel shuffle, or all patches for "patch"."""
        if self.fusion == "patch":
            return self.num_patches
        return round(self.num_patches * self.pixel_shuffle_ratio**2)

    @property
    def output_dim(self) -> int:
        """Width of the per-token features the multimodal projector maps into the text hidden size."""
        if self.fusion == "patch":
            return self.num_channels * self.patch_size**2
        return self.vision_output_dim

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Llama4XVisionConfig":
        """The vision config of a named preset (`"tiny"`, `"scout"`, `"maverick"`), with fields overridden."""
        if name not in VISION_PRESETS:
            raise ValueError(f"Unknown preset {name!r}: expected one of {sorted(VISION_PRESETS)}.")
        return cls(**{**copy.deepcopy(VISION_PRESETS[name]), **overrides})


@strict
class Llama4XConfig(_ValidatedOverrides, PreTrainedConfig):
    r"""
    Composite llama4x config: the text decoder (`text_config`), the vision front-end (`vision_config`; defaults to
    Llama 4's vision encoder) and the special tokens of early fusion (Llama 4's names and ids by default):

    image_token_index (`image_token_id`): the `<|patch|>` placeholder; each one is replaced by one image embedding.
    boi_token_index (`boi_token_id`), eoi_token_index (`eoi_token_id`): `<|image_start|>` / `<|image_end|>`, which
        frame an image in the text. All three must be distinct ids of the text vocabulary.
    """

    model_type = "llama4x"
    # Outputs `Trainer.evaluate` must not gather as predictions (transformers 5.17 gathers whatever is not listed).
    keys_to_ignore_at_inference = ["cache", "past_key_values", "image_hidden_states"]
    attribute_map = {
        "image_token_id": "image_token_index",
        "boi_token_id": "boi_token_index",
        "eoi_token_id": "eoi_token_index",
    }
    sub_configs = {"text_config": Llama4XTextConfig, "vision_config": Llama4XVisionConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_index: int = 200092
    boi_token_index: int = 200080
    eoi_token_index: int = 200081
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for field, config_class in self.sub_configs.items():
            value = getattr(self, field)
            if value is None:
                setattr(self, field, config_class())
            elif isinstance(value, dict):
                setattr(self, field, config_class(**value))
            elif not isinstance(value, config_class):
                _fail(field, type(value).__name__, f"a {config_class.__name__} or a dict of its fields")
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        vocab_size = self.text_config.vocab_size
        ids = {}
        for alias, field in self.attribute_map.items():
            value, name = getattr(self, field), f"{field}` / `{alias}"
            if not 0 <= value < vocab_size:
                _fail(name, value, f"a token id in [0, {vocab_size}) (text_config.vocab_size={vocab_size})")
            if value in ids:
                _fail(name, value, f"an id different from {ids[value]}={value}")
            ids[value] = field

    @classmethod
    def from_preset(
        cls, name: str, vision_overrides: dict[str, Any] | None = None, **text_overrides: Any
    ) -> "Llama4XConfig":
        """The composite config of a named preset; keyword arguments override text-config fields and
        `vision_overrides` vision-config fields (e.g. `{"fusion": "patch"}`)."""
        return cls(
            text_config=Llama4XTextConfig.from_preset(name, **text_overrides),
            vision_config=Llama4XVisionConfig.from_preset(name, **(vision_overrides or {})),
            **SPECIAL_TOKEN_PRESETS[name],
        )


_LLAMA4_SHARED: dict[str, Any] = {
    "vocab_size": 202048,
    "hidden_size": 5120,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 16384,
    "moe_intermediate_size": 8192,
    "num_experts_per_tok": 1,
    "num_shared_experts": 1,
    "router_score_func": "sigmoid",
    "router_weight_on_input": True,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008],
    "pad_token_id": 200018,
}

TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # Llama 4 Scout (17B active, 16 experts): every layer MoE, QK-norm, llama3-scaled RoPE for a 10M context.
    "scout": {
        **_LLAMA4_SHARED,
        "num_local_experts": 16,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": "l2",
        "max_position_embeddings": 10485760,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # Llama 4 Maverick (17B active, 128 experts): MoE on every other layer, no QK-norm, plain RoPE.
    "maverick": {
        **_LLAMA4_SHARED,
        "num_local_experts": 128,
        "interleave_moe_layer_step": 2,
        "use_qk_norm": "none",
        "max_position_embeddings": 1048576,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
    # A few-million-parameter model with every feature of the family, for tests, demos and benchmarks on a CPU.
    "tiny": {
        "vocab_size": 4096,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 256,
        "moe_intermediate_size": 128,
        "num_local_experts": 16,
        "num_experts_per_tok": 1,
        "num_shared_experts": 1,
        "interleave_moe_layer_step": 1,
        "no_rope_layer_interval": 2,
        "attention_chunk_size": 64,
        "attn_temperature_tuning": True,
        "floor_scale": 32,
        "attn_scale": 0.1,
        "use_qk_norm": "l2",
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}

# Llama 4's vision encoder, shared by Scout and Maverick (their published `vision_config`).
_LLAMA4_VISION: dict[str, Any] = {
    "fusion": "encoder",
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_size": 1408,
    "num_hidden_layers": 34,
    "num_attention_heads": 16,
    "intermediate_size": 5632,
    "hidden_act": "gelu",
    "norm_eps": 1e-5,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "vision_output_dim": 4096,
    "rope_theta": 10000.0,
}

VISION_PRESETS: dict[str, dict[str, Any]] = {
    "scout": _LLAMA4_VISION,
    "maverick": _LLAMA4_VISION,
    # 32-pixel tiles of 4x4 patches; pixel shuffle 0.5 leaves 4 tokens per tile.
    "tiny": {
        "fusion": "encoder",
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 64,
        "projector_output_dim": 64,
        "vision_output_dim": 64,
        "rope_theta": 10000.0,
    },
}

# `<|patch|>`, `<|image_start|>`, `<|image_end|>`: Llama 4's ids, and for "tiny" the ids `llama4x.tokenization` gives.
_LLAMA4_SPECIAL_TOKENS = {"image_token_index": 200092, "boi_token_index": 200080, "eoi_token_index": 200081}
SPECIAL_TOKEN_PRESETS: dict[str, dict[str, int]] = {
    "scout": _LLAMA4_SPECIAL_TOKENS,
    "maverick": _LLAMA4_SPECIAL_TOKENS,
    "tiny": {"image_token_index": 6, "boi_token_index": 4, "eoi_token_index": 5},
}
