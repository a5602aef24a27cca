"""llama4x early fusion: image features replace the image placeholder tokens in the one sequence the decoder sees.

`Llama4XModel` = vision front-end (vision.py) + multimodal projector + `Llama4XTextModel`;
`Llama4XForConditionalGeneration` adds the LM head, the loss and generation.

Inputs: `input_ids (B, S)` in which every image tile is a run of `tokens_per_tile` `image_token_id` (`<|patch|>`)
tokens, and `pixel_values (N, C, I, I)`: the tiles of all images of the batch in reading order (row by row, images in
text order). Row-major order of the placeholders and tile order must agree; the i-th placeholder receives the i-th
feature row. Shapes as in vision.py; B batch, S sequence length, V vocabulary.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.import_utils import torch_compilable_check

from .configuration_llama4x import Llama4XConfig, Llama4XVisionConfig
from .modeling_llama4x import (
    Llama4XCausalLMOutput,
    Llama4XModelOutput,
    Llama4XPreTrainedModel,
    Llama4XTextModel,
    causal_lm_loss,
)
from .validation import check_input_ids
from .vision import Llama4XMultiModalProjector, Llama4XVisionModel


@dataclass
class Llama4XMultimodalModelOutput(Llama4XModelOutput):
    """Decoder output plus `image_hidden_states (N, T, H)`: the projected image features of this call, if any."""

    image_hidden_states: torch.Tensor | None = None


@dataclass
class Llama4XMultimodalCausalLMOutput(Llama4XCausalLMOutput):
    """LM output plus `image_hidden_states (N, T, H)`: the projected image features of this call, if any."""

    image_hidden_states: torch.Tensor | None = None


def check_pixel_values(pixel_values: torch.Tensor, config: Llama4XVisionConfig) -> None:
    """Raise a `ValueError` unless `pixel_values` is a non-empty, finite `(N, C, I, I)` batch of tiles."""
    expected = f"(num_tiles, {config.num_channels}, {config.image_size}, {config.image_size})"
    shape = tuple(pixel_values.shape)
    if pixel_values.ndim != 4:
        raise ValueError(f"`pixel_values` must have shape {expected}, got {shape}.")
    if shape[1] != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {shape[1]} channels, but vision_config.num_channels={config.num_channels}; "
            f"expected shape {expected}, got {shape}."
        )
    if shape[2:] != (config.image_size, config.image_size):
        raise ValueError(
            f"`pixel_values` tiles are {shape[2]}x{shape[3]}, but vision_config.image_size={config.image_size}; "
            f"expected shape {expected}, got {shape}."
        )
    if shape[0] == 0:
        raise ValueError(f"`pixel_values` is empty (0 tiles, shape {shape}); pass None for text-only inputs.")
    if not pixel_values.is_floating_point():
        raise ValueError(f"`pixel_values` must be a floating-point tensor, got {pixel_values.dtype}.")
    torch_compilable_check(torch.isfinite(pixel_values).all(), "`pixel_values` contains NaN or infinite values.")


class Llama4XMultimodalPreTrainedModel(Llama4XPreTrainedModel):
    """Base of the multimodal llama4x models: the composite `Llama4XConfig`, text and vision layers kept whole."""

    config_class = Llama4XConfig
    config: Llama4XConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["Llama4XDecoderLayer", "Llama4XVisionEncoderLayer"]
    _supports_pipeline_stages = False  # the decoder's layers sit in `language_model`, behind the vision front-end

    def _init_weights(self, module: nn.Module) -> None:
        # The text and vision sub-models are `PreTrainedModel`s that initialise their own modules with their own
        # configs (transformers dispatches per sub-model); only the projector and the LM head are left: plain linears.
        PreTrainedModel._init_weights(self, module)

    def create_masks_for_generate(self, config: Llama4XConfig, *args, **kwargs) -> dict:
        """The decoder's masks for compilable caches; `generate` passes the composite config, they need the text one."""
        return super().create_masks_for_generate(config.get_text_config(), *args, **kwargs)


class Llama4XModel(Llama4XMultimodalPreTrainedModel):
    """Vision front-end, multimodal projector and the text decoder; image features replace the image tokens."""

    def __init__(self, config: Llama4XConfig):
        super().__init__(config)
        self.vision_model = Llama4XVisionModel(config.vision_config)
        self.multi_modal_projector = Llama4XMultiModalProjector(config)
        self.language_model = Llama4XTextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles `(N, C, I, I)` -> their embeddings in the text space `(N, T, H)`, T = `vision_config.tokens_per_tile`.

        Raises a `ValueError` for a wrong shape or channel count, an empty batch, or NaN/inf values.
        """
        check_pixel_values(pixel_values, self.config.vision_config)
        return self._project_images(pixel_values)

    def _project_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision_model(pixel_values.to(self.multi_modal_projector.weight.dtype))  # (N, T, F)
        return self.multi_modal_projector(features)  # (N, T, H)

    def embed_inputs(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None, cache: Cache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings `(B, S, H)` with the image features scattered into the `image_token_id` positions, and the
        image features `(N, T, H)` (None without images). The placeholder count must equal `N * T`, in whole tiles of
        `T` per row.

        Without `pixel_values`, image tokens are an error, except in decoding steps (the cache already holds tokens):
        an image token the model generated has no image behind it and is embedded like any token.
        """
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, S, H)
        image_token_id = self.config.image_token_id
        image_mask = input_ids == image_token_id  # (B, S)
        if pixel_values is None:
            if cache is None or cache.get_seq_length() == 0:
                torch_compilable_check(
                    ~image_mask.any(),
                    lambda: (
                        f"`input_ids` contain {int(image_mask.sum())} image tokens "
                        f"(image_token_id={image_token_id}) but no `pixel_values` were given."
                    ),
                )
            return inputs_embeds, None

        check_pixel_values(pixel_values, self.config.vision_config)
        num_tiles, tokens_per_tile = pixel_values.shape[0], self.config.vision_config.tokens_per_tile
        num_features = num_tiles * tokens_per_tile
        num_placeholders = image_mask.sum()

        def where() -> str:  # for the error messages only
            # A continuation (generate with a filled cache) embeds only the tokens after the cache: its pixel_values
            # must be the tiles of the images among those tokens, not those of images the cache already holds.
            cached = 0 if cache is None else int(cache.get_seq_length())
            if not cached:
                return "`input_ids` contain"
            return (
                f"the {input_ids.shape[-1]} tokens after the cache ({cached} cached; pass only their images) contain"
            )

        torch_compilable_check(
            num_placeholders > 0,
            lambda: (
                f"`pixel_values` were given ({num_tiles} tiles) but {where()} no image tokens "
                f"(image_token_id={image_token_id})."
            ),
        )
        torch_compilable_check(
            num_placeholders == num_features,
            lambda: (
                f"{where()} {int(num_placeholders)} image tokens (image_token_id={image_token_id}) "
                f"but `pixel_values` give {num_features} image features ({num_tiles} x {tokens_per_tile} per tile)."
            ),
        )
        per_row = image_mask.sum(-1)  # (B,)
        torch_compilable_check(
            (per_row % tokens_per_tile == 0).all(),
            lambda: (
                f"Image tokens per row of `input_ids`: {per_row.tolist()}, not all whole tiles of {tokens_per_tile} "
                f"(image_token_id={image_token_id}): each tile's features must stay in one row."
            ),
        )
        image_features = self._project_images(pixel_values)  # (N, T, H)
        flat_features = image_features.reshape(-1, image_features.shape[-1])  # (N * T, H)
        # the vision tower may sit on another device than the embeddings (accelerate device maps)
        flat_features = flat_features.to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], flat_features)
        return inputs_embeds, image_features

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Llama4XMultimodalModelOutput:
        """`input_ids (B, S)` with image placeholders and the tiles `pixel_values (N, C, I, I)` (see the module
        docstring), or ready `inputs_embeds (B, S, H)` without `pixel_values`. Other arguments as `Llama4XTextModel`;
        `cache` is `past_key_values` before transformers 5.24."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        image_features = None
        if input_ids is not None:
            # The decoder sees only the embeddings (and checks the rest): the ids are checked before embedding them.
            check_input_ids(self.config.text_config, input_ids)
            inputs_embeds, image_features = self.embed_inputs(input_ids, pixel_values, cache)
        elif pixel_values is not None:
            raise ValueError(
                "`pixel_values` need `input_ids`: image features replace its image tokens. With `inputs_embeds`, "
                "scatter `get_image_features(pixel_values)` into them yourself."
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        return Llama4XMultimodalModelOutput(**outputs, image_hidden_states=image_features)


class Llama4XForConditionalGeneration(Llama4XMultimodalPreTrainedModel, GenerationMixin):
    """Early-fusion image+text model with a language-modelling head.

    In `generate`, `pixel_values` reach only the first forward pass (transformers' `prepare_inputs_for_generation`
    drops them from cached decoding steps); `suppress_tokens=[config.image_token_id]` keeps the model from generating
    image placeholders that no image backs.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: Llama4XConfig):
        super().__init__(config)
        self.model = Llama4XModel(config)
        self.vocab_size = config.text_config.vocab_size
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles `(N, C, I, I)` -> their embeddings in the text space `(N, T, H)`."""
        return self.model.get_image_features(pixel_values)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
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
    ) -> Llama4XMultimodalCausalLMOutput:
        """As `Llama4XModel.forward`, plus `labels (B, S)` (shifted inside; -100 ignored: set it at image tokens to
        leave them out of the loss) and `logits_to_keep`. The loss adds the weighted balancing losses."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
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
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])  # (B, S_kept, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(self.loss_function, logits, labels, outputs, self.config.text_config, **kwargs)
        fields = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return Llama4XMultimodalCausalLMOutput(loss=loss, logits=logits, **fields)

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        """Beam search and `num_return_sequences` repeat each batch row; transformers repeats every tensor along dim 0,
        which would interleave the tiles of a multi-tile row. Repeat each row's run of tiles instead."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            index = self._tile_index_for_expansion(input_ids, pixel_values.shape[0], expand_size)
            pixel_values = pixel_values[index.to(pixel_values.device)]
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return expanded_ids, model_kwargs

    def _tile_index_for_expansion(self, input_ids: torch.LongTensor, num_tiles: int, expand_size: int) -> torch.Tensor:
        """Tile indices `[tiles of row 0] * expand_size + [tiles of row 1] * expand_size + ...`; each tile repeated in
        place when the placeholders do not split into whole tiles (the forward pass then reports the mismatch)."""
        tokens_per_tile = self.config.vision_config.tokens_per_tile
        placeholders = (input_ids == self.config.image_token_id).sum(-1).tolist()
        if sum(placeholders) != num_tiles * tokens_per_tile or any(n % tokens_per_tile for n in placeholders):
            return torch.arange(num_tiles).repeat_interleave(expand_size)
        index, start = [], 0
        for count in (n // tokens_per_tile for n in placeholders):
            index.extend(list(range(start, start + count)) * expand_size)
            start += count
        return torch.tensor(index, dtype=torch.long)
