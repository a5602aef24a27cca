"""Training the byte-level BPE tokenizer that carries llama4x's special tokens.

The tokenizer is built with the `tokenizers` library and returned as a `transformers.PreTrainedTokenizerFast`, so it
saves with `save_pretrained` and reloads with `AutoTokenizer.from_pretrained`.

Conventions:

- The special tokens (`SPECIAL_TOKENS`, Llama 4's names) get the first ids, in list order: `<|begin_of_text|>` is 0,
  `<|end_of_text|>` is 1, `<|pad|>` is 2, ...
- Byte-level pre-tokenization with no normalizer and no prefix space, so every string round-trips exactly:
  `tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text` for any unicode text.
- BOS is added by the post-processor: `tokenizer(text)` / `tokenizer.encode(text)` start with `<|begin_of_text|>`
  (as Llama 4's tokenizer does); pass `add_special_tokens=False` to get the bare text ids. EOS is never added
  automatically; data packing (`llama4x.data.pack_token_ids`) appends it between documents.
- Chat: `CHAT_TEMPLATE` (Llama 4's turn format, without tools) is stored on the trained tokenizer and is the default
  template of `llama4x.Llama4XProcessor`. Every turn is `<|header_start|>{role}<|header_end|>\n\n{content}<|eot|>`;
  the conversation starts with `<|begin_of_text|>`; an image content item renders as `<|image|>`; a leading system
  message's content is stripped of surrounding whitespace (as in Llama 4).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IMAGE_TOKEN = "<|image|>"
EOT_TOKEN = "<|eot|>"

SPECIAL_TOKENS: list[str] = [
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IMAGE_TOKEN,
    "<|image_start|>",
    "<|image_end|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|header_start|>",
    "<|header_end|>",
    EOT_TOKEN,
]

# Llama 4's turn layout. Content is a string or a list of `{"type": "text", "text": ...}` / `{"type": "image"}` items;
# a leading system message is stripped of surrounding whitespace, as Llama 4's template does;
# assistant turns (their `<|eot|>` included) are wrapped in `{% generation %}` so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens a model should learn to emit.
# Tools are not supported: tool messages, tool calls and `tools=` raise an error rather than vanish from the text.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}<|image|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}{{- raise_exception('llama4x chat template: tools are not supported') -}}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ('system', 'user', 'assistant') or message.get('tool_calls') -%}"
    "{{- raise_exception('llama4x chat template: the roles are system, user and assistant, without tool calls; got '"
    " + message['role'] + (' with tool calls' if message.get('tool_calls') else '')) -}}"
    "{%- endif -%}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render(message['content']) + '<|eot|>' -}}{%- endgeneration -%}"
    "{%- elif loop.first and message['role'] == 'system' -%}{{- render(message['content']) | trim + '<|eot|>' -}}"
    "{%- else -%}{{- render(message['content']) + '<|eot|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|header_start|>assistant<|header_end|>\n\n' -}}{%- endif -%}"
)

# Llama 3's pre-tokenization (words, numbers of at most 3 digits, punctuation runs, whitespace): unlike GPT-2's, a
# run of newlines is one piece whatever follows it, so a chat prompt ending in "<|header_end|>\n\n" is a prefix of
# the tokens of the conversation that goes on from it (what the assistant-token mask and generation rely on).
PRE_TOKENIZER_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Byte-level BPE starts from one symbol per byte value.
BYTE_ALPHABET_SIZE = 256


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    Args:
        texts: the training corpus, one document per string. Must contain at least one non-empty string.
        vocab_size: the total vocabulary size, special tokens and the 256-symbol byte alphabet included. BPE stops
            earlier if the corpus has no more merges with `min_frequency` occurrences, so `len(tokenizer)` can be
            smaller than `vocab_size`.
        min_frequency: minimum number of occurrences for a pair to be merged.
        model_max_length: stored on the tokenizer (used for truncation warnings); `None` leaves transformers'
            default.

    Returns:
        The tokenizer, with `bos_token`, `eos_token` and `pad_token` set, the other `SPECIAL_TOKENS` registered
        as extra special tokens, `CHAT_TEMPLATE` as its chat template and left padding (for generation). See the module docstring for the BOS
        convention.

    Raises:
        ValueError: if `vocab_size` leaves no room for merges, `min_frequency` < 1, or `texts` is empty.
    """
    min_vocab = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
    if not isinstance(vocab_size, int) or vocab_size <= min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size!r} must be an int greater than {min_vocab} "
            f"({len(SPECIAL_TOKENS)} special tokens + {BYTE_ALPHABET_SIZE} byte symbols)"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r} must be an int >= 1")
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, got a single str")
    texts = list(texts)
    if not any(isinstance(t, str) and t for t in texts):
        raise ValueError(f"texts must contain at least one non-empty string, got {len(texts)} item(s)")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"texts must contain only str, got an item of type {type(bad).__name__}")

    tokenizer = Tokenizer(models.BPE())
    # No normalizer: normalisation (NFC, lowercasing...) would break the exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # batched prompts generate as they do alone (pipelines too); collators pad explicitly
        **kwargs,
    )


def special_token_ids(tokenizer: PreTrainedTokenizerFast, tokens: Sequence[str] = SPECIAL_TOKENS) -> dict[str, int]:
    """Map each special token in `tokens` to its id in `tokenizer`.

    Raises:
        ValueError: if `tokenizer` does not carry one of `tokens` as a single token.
    """
    ids = {}
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no special token {token!r}")
        ids[token] = token_id
    return ids
