"""llama4x vision front-ends: how image tiles become embeddings in the text decoder's input sequence (early fusion).

`Llama4XVisionModel` is, by `vision_config.fusion`, either Llama 4's ViT encoder (`"encoder"`: unfold patch
embedding, class token, learned positions, pre-norm layers with 2-D RoPE, pixel shuffle, MLP adapter) or Fuyu-style
raw patches (`"patch"`: no parameters, no encoder). `Llama4XMultiModalProjector` then maps either into the text hidden
size; `Llama4XModel.get_image_features` (modeling_multimodal.py) chains the two.

Shapes: N tiles (all tiles of a batch, concatenated), C channels, I image_size (tile side in pixels), p patch_size,
P = (I / p)**2 patches per tile, Hv vision hidden size, nH heads, D head dim (Hv / nH), r pixel_shuffle_ratio,
T tokens per tile (P * r**2 for "encoder", P for "patch"), F feature width before the projector (vision_output_dim
for "encoder", C * p * p for "patch"), H text hidden size.

Weight names, llama4x `Llama4XForConditionalGeneration` -> transformers `Llama4ForConditionalGeneration`. Every
tensor has the same shape on both sides and is copied unchanged (`{i}` is the layer index; `*` is `weight`, `bias`;
`V.` stands for llama4x's `model.vision_model.` and `v.` for Llama 4's `vision_model.`):

| llama4x                                        | transformers Llama 4                                  |
|------------------------------------------------|-------------------------------------------------------|
| V.patch_embedding.linear.weight                | v.patch_embedding.linear.weight                       |
| V.class_embedding                              | v.class_embedding                                     |
| V.positional_embedding                         | v.positional_embedding_vlm                            |
| V.layernorm_pre.*                              | v.layernorm_pre.*                                     |
| V.layers.{i}.input_layernorm.*                 | v.model.layers.{i}.input_layernorm.*                  |
| V.layers.{i}.self_attn.{q,k,v,o}_proj.*        | v.model.layers.{i}.self_attn.{q,k,v,o}_proj.*         |
| V.layers.{i}.post_attention_layernorm.*        | v.model.layers.{i}.post_attention_layernorm.*         |
| V.layers.{i}.mlp.fc1.*, .mlp.fc2.*             | v.model.layers.{i}.mlp.fc1.*, .mlp.fc2.*              |
| V.layernorm_post.*                             | v.layernorm_post.*                                    |
| V.vision_adapter.fc1.weight, .fc2.weight       | v.vision_adapter.mlp.fc1.weight, .mlp.fc2.weight      |
| model.multi_modal_projector.weight             | multi_modal_projector.linear_1.weight                 |
| model.language_model.<rest>                    | language_model.model.<rest> (the text decoder)        |
| lm_head.weight                                 | language_model.lm_head.weight                         |

The vision rotary embedding has no weights on either side (transformers keeps a non-persistent `freqs_ci` buffer).
Config differences: Llama 4 sizes its adapter's `fc1` input by `intermediate_size` and its `fc2` input by
`projector_output_dim`; here they are `hidden_size / r**2` and `projector_input_dim` (the same numbers for the
published checkpoints: 1408 / 0.5**2 = 5632 and 4096). Llama 4 hard-codes exact GELU and LayerNorm eps 1e-5 where
llama4x reads `hidden_act` and `norm_eps` (published: "gelu", 1e-5).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama4.modeling_llama4 import pixel_shuffle
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_llama4x import Llama4XConfig, Llama4XVisionConfig
from .modeling_llama4x import apply_interleaved_rope, eager_attention_forward


def unfold_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(N, C, I, I)` -> `(N, P, C * p * p)`: non-overlapping patches in row-major order, each flattened channel-first
    (`nn.Unfold`'s layout, which Llama 4's patch-embedding weight expects)."""
    return F.unfold(pixel_values, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


class Llama4XPatchEmbedding(nn.Module):
    """Llama 4's "unfold convolution": a bias-free linear map of each flattened patch, (N, C, I, I) -> (N, P, Hv)."""

    def __init__(self, config: Llama4XVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.linear = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.linear(unfold_patches(pixel_values, self.patch_size))


class Llama4XVisionRotaryEmbedding(nn.Module):
    """Llama 4's 2-D RoPE as `(cos, sin)`, each `(1, P + 1, D)`, in the interleaved-pair layout of the text RoPE.

    Pair `j < D/4` turns by `(column + 1) * f_j`, pair `D/4 + j` by `(row + 1) * f_j`, with `f_j = theta^(-4j / D)`;
    the class token (last) is not turned. Numerically Llama 4's complex `freqs_ci`, as real cos/sin.
    """

    def __init__(self, config: Llama4XVisionConfig):
        super().__init__()
        self.grid_side = config.image_size // config.patch_size
        self.head_dim = config.head_dim
        self.theta = float(config.rope_theta)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed per call (a few KiB) rather than kept in a buffer: nothing to re-initialise after meta-device loads.
        freq_dim = self.head_dim // 2
        inv_freq = 1.0 / self.theta ** (torch.arange(0, freq_dim, 2, device=x.device).float() / freq_dim)  # (D/4,)
        patch = torch.arange(self.grid_side**2, device=x.device)
        column, row = patch % self.grid_side + 1, patch // self.grid_side + 1
        angles = torch.cat([column[:, None] * inv_freq, row[:, None] * inv_freq], dim=-1)  # (P, D/2)
        angles = F.pad(angles, (0, 0, 0, 1))  # (P + 1, D/2): angle 0 for the class token
        angles = angles.repeat_interleave(2, dim=-1)[None]  # (1, P + 1, D)
        return angles.cos(), angles.sin()


class Llama4XVisionAttention(nn.Module):
    """Bidirectional multi-head self-attention over the tokens of one tile, with 2-D RoPE on queries and keys,
    dispatched through `ALL_ATTENTION_FUNCTIONS` (no mask)."""

    def __init__(self, config: Llama4XVisionConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_key_value_groups = 1  # read by the attention kernels: no GQA here
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (N, P + 1)
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim)  # (N, P + 1, nH, D)
        key = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (N, nH, P + 1, D)
        cos, sin = position_embeddings
        query = apply_interleaved_rope(query, cos, sin).transpose(1, 2)  # (N, nH, P + 1, D)
        key = apply_interleaved_rope(key, cos, sin).transpose(1, 2)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (N, P + 1, Hv)
        return self.o_proj(attn_output), attn_weights


class Llama4XVisionMLP(nn.Module):
    """`fc2(act(fc1(x)))` with biases, `Hv -> intermediate_size -> Hv`."""

    def __init__(self, config: Llama4XVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(x)))


class Llama4XVisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm (LayerNorm) attention and MLP, each added to the residual stream."""

    def __init__(self, config: Llama4XVisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = Llama4XVisionAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = Llama4XVisionMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Llama4XVisionAdapter(nn.Module):
    """Pixel shuffle, then a bias-free two-layer MLP with the activation after both layers (as Llama 4):
    `(N, P, Hv)` -> `(N, T, Hv / r**2)` -> `(N, T, F)`."""

    def __init__(self, config: Llama4XVisionConfig):
        super().__init__()
        self.pixel_shuffle_ratio = config.pixel_shuffle_ratio
        shuffled_dim = round(config.hidden_size / config.pixel_shuffle_ratio**2)
        self.fc1 = nn.Linear(shuffled_dim, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_input_dim, config.projector_output_dim, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(x, self.pixel_shuffle_ratio)  # (N, T, Hv / r**2); transformers' own reshape order
        return self.act_fn(self.fc2(self.act_fn(self.fc1(x))))


class Llama4XVisionModel(PreTrainedModel):
    """The vision front-end before the projector: tiles `(N, C, I, I)` -> features `(N, T, F)`.

    `"encoder"`: Llama 4's ViT. `"patch"`: the flattened raw patches themselves (no parameters; the projector that
    follows is then Fuyu's linear patch embedding).
    """

    config_class = Llama4XVisionConfig
    config: Llama4XVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Llama4XVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: Llama4XVisionConfig):
        super().__init__(config)
        if config.fusion == "encoder":
            self.patch_embedding = Llama4XPatchEmbedding(config)
            self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
            self.positional_embedding = nn.Parameter(torch.empty(config.num_patches + 1, config.hidden_size))
            self.layernorm_pre = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
            self.rotary_emb = Llama4XVisionRotaryEmbedding(config)
            self.layers = nn.ModuleList(Llama4XVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
            self.layernorm_post = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
            self.vision_adapter = Llama4XVisionAdapter(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Llama4XVisionModel) and module.config.fusion == "encoder":
            std = module.config.hidden_size**-0.5  # Llama 4's scale for the class and position embeddings
            init.normal_(module.class_embedding, std=std)
            init.normal_(module.positional_embedding, std=std)

    def get_input_embeddings(self) -> nn.Module | None:
        """The patch embedding (None for `"patch"`), which `enable_input_require_grads` hooks so that reentrant
        gradient checkpointing reaches the vision layers when the patch embedding is frozen (adapters)."""
        return self.patch_embedding if self.config.fusion == "encoder" else None

    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """`pixel_values (N, C, I, I)` -> `(N, T, F)`. Inputs are not validated here; see
        `Llama4XModel.get_image_features`."""
        if self.config.fusion == "patch":
            return unfold_patches(pixel_values, self.config.patch_size)  # (N, P, C * p * p)
        hidden_states = self.patch_embedding(pixel_values)  # (N, P, Hv)
        class_token = self.class_embedding.to(hidden_states.dtype).expand(hidden_states.shape[0], 1, -1)
        hidden_states = torch.cat([hidden_states, class_token], dim=1)  # (N, P + 1, Hv): Llama 4 appends it last
        hidden_states = self.layernorm_pre(hidden_states + self.positional_embedding.to(hidden_states.dtype))
        position_embeddings = self.rotary_emb(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, **kwargs)
        hidden_states = self.layernorm_post(hidden_states)[:, :-1]  # (N, P, Hv): the class token is dropped
        return self.vision_adapter(hidden_states)  # (N, T, F)


class Llama4XMultiModalProjector(nn.Linear):
    """Bias-free linear map of the vision features into the text hidden size, `(N, T, F)` -> `(N, T, H)`."""

    def __init__(self, config: Llama4XConfig):
        super().__init__(config.vision_config.output_dim, config.text_config.hidden_size, bias=False)
