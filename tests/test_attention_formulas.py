"""Llama 4's attention temperature tuning and Scalable-Softmax, against formulas computed by hand.

`Llama4XAttention` is run standalone: `config._attn_implementation` picks the attention function and the test
passes its own additive float mask of shape (B, 1, S, S) (0 where a query may see a key, -inf elsewhere), so no
model-level mask construction is involved. The references below recompute the layer in float64 from its weights:
q/k/v projections, the interleaved-pair RoPE (written here), GQA head sharing, logit multipliers, the mask,
softmax, o_proj.

tiny_text_config: 4 layers, NoPE every 2nd layer (layer 1 is a full-attention NoPE layer, layer 0 a chunked RoPE
layer with chunk 8), 4 query heads / 2 kv heads, head_dim 8, floor_scale 4, attn_scale 0.5, rope_theta 10000.
"""

import math

import pytest
import torch

from llama4x.modeling_llama4x import Llama4XAttention, Llama4XRotaryEmbedding
from tiny import tiny_text_config

NOPE_LAYER, CHUNKED_LAYER = 1, 0
CHUNK, HEADS, KV_HEADS, HEAD_DIM, THETA = 8, 4, 2, 8, 10000.0
SSMAX_S = [0.3, 0.6, 0.9, 1.2]  # distinct per-head Scalable-Softmax scales
ATTN_IMPLEMENTATIONS = ["eager", "sdpa"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP wake-up stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def temperature_by_hand(pos: int, floor_scale: int = 4, attn_scale: float = 0.5) -> float:
    return 1.0 + attn_scale * math.log1p(math.floor((pos + 1) / floor_scale))


def make_attention(layer_idx: int, attn_implementation: str = "eager", seed: int = 0, **overrides) -> Llama4XAttention:
    config = tiny_text_config(**overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    attn = Llama4XAttention(config, layer_idx).eval()
    if hasattr(attn, "ssmax_scale"):
        with torch.no_grad():
            attn.ssmax_scale.copy_(torch.tensor(SSMAX_S))
    return attn


def additive_mask(batch: int, length: int, chunk: int | None) -> torch.Tensor:
    """(B, 1, S, S) float mask: query i sees keys j <= i (in its own chunk when `chunk` is set)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = j <= i
    if chunk is not None:
        allowed &= (j // chunk) == (i // chunk)
    mask = torch.zeros(length, length).masked_fill(~allowed, float("-inf"))
    return mask.expand(batch, 1, length, length)


def rope_pairs64(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of `x (B, S, heads, D)` by the angle pos * theta^(-2i/D), in float64."""
    d = x.shape[-1]
    inv_freq = THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (D/2,)
    angle = positions.double()[:, :, None, None] * inv_freq  # (B, S, 1, D/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def reference_attention(
    attn: Llama4XAttention,
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    rope: bool,
    chunk: int | None,
    query_multiplier: torch.Tensor | None = None,
    logit_multiplier: torch.Tensor | None = None,
    l2_qk_norm: bool = False,
    eps: float = 1e-5,
) -> torch.Tensor:
    """float64 attention layer. `query_multiplier (B, S)` scales q; `logit_multiplier (B, nH, S)` scales logits."""
    batch, length, _ = x.shape
    x64 = x.double()
    q = (x64 @ attn.q_proj.weight.double().T).view(batch, length, HEADS, HEAD_DIM)
    k = (x64 @ attn.k_proj.weight.double().T).view(batch, length, KV_HEADS, HEAD_DIM)
    v = (x64 @ attn.v_proj.weight.double().T).view(batch, length, KV_HEADS, HEAD_DIM)
    if rope:
        q, k = rope_pairs64(q, positions), rope_pairs64(k, positions)
    if l2_qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps)
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps)
    if query_multiplier is not None:
        q = q * query_multiplier.double()[:, :, None, None]
    group = HEADS // KV_HEADS
    out = torch.zeros(batch, length, HEADS, HEAD_DIM, dtype=torch.float64)
    mask = additive_mask(batch, length, chunk)[:, 0].double()  # (B, S, S)
    for h in range(HEADS):
        kv = h // group  # query heads [g * group, (g + 1) * group) share kv head g
        logits = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, kv]) / math.sqrt(HEAD_DIM)
        if logit_multiplier is not None:
            logits = logits * logit_multiplier[:, h, :, None].double()
        probs = torch.softmax(logits + mask, dim=-1)
        out[:, :, h] = torch.einsum("bij,bjd->bid", probs, v[:, :, kv])
    return out.reshape(batch, length, HEADS * HEAD_DIM) @ attn.o_proj.weight.double().T


def run_attention(attn: Llama4XAttention, x: torch.Tensor, positions: torch.Tensor, chunk: int | None):
    """The module's forward with its own rotary embedding's (cos, sin) and the hand-built mask."""
    position_embeddings = Llama4XRotaryEmbedding(attn.config)(x, positions)
    mask = additive_mask(x.shape[0], x.shape[1], chunk)
    with torch.no_grad():
        out, _ = attn(x, position_embeddings, positions, mask, cache=None)
    return out


def inputs(batch: int = 2, length: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(length)[None].expand(batch, length)
    return x, positions


def assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    diff = (got.double() - expected).abs().max().item()
    assert got.shape == expected.shape, f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert diff < tol, f"max abs diff {diff:.3e}"


# ---- temperature tuning -------------------------------------------------------------------------------------------


def test_temperature_tuning_query_scale_on_nope_layer_matches_hand_formula():
    attn = make_attention(NOPE_LAYER)
    assert not attn.use_rope
    positions = torch.arange(41)[None]
    scale = attn.query_scale(positions)
    assert scale.shape == (1, 41, 1, 1)
    expected = torch.tensor([temperature_by_hand(p) for p in range(41)], dtype=torch.float64)
    assert_close(scale[0, :, 0, 0], expected, tol=1e-6)
    # spot values: floor((pos + 1) / 4) is 0 for pos < 3, so no scaling there; pos 3 -> 1 + 0.5 * log(2)
    assert scale[0, :3].eq(1.0).all()
    assert abs(scale[0, 3].item() - (1 + 0.5 * math.log(2))) < 1e-6


def test_temperature_tuning_is_identity_when_disabled_and_absent_on_rope_layers():
    assert make_attention(NOPE_LAYER, attn_temperature_tuning=False).query_scale(torch.arange(10)[None]) is None
    rope_attn = make_attention(CHUNKED_LAYER)
    assert rope_attn.use_rope and rope_attn.config.attn_temperature_tuning
    assert rope_attn.query_scale(torch.arange(10)[None]) is None


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("tuning", [True, False], ids=["tuning_on", "tuning_off"])
def test_nope_layer_output_matches_float64_attention_with_temperature_scaled_queries(attn_implementation, tuning):
    attn = make_attention(NOPE_LAYER, attn_implementation, use_qk_norm="none", attn_temperature_tuning=tuning)
    x, positions = inputs()
    got = run_attention(attn, x, positions, chunk=None)
    multiplier = None
    if tuning:
        multiplier = torch.tensor([[temperature_by_hand(int(p)) for p in row] for row in positions])
    expected = reference_attention(attn, x, positions, rope=False, chunk=None, query_multiplier=multiplier)
    assert_close(got, expected)


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("qk_norm", ["none", "l2"])
def test_chunked_rope_layer_output_matches_float64_reference_without_temperature_scaling(attn_implementation, qk_norm):
    attn = make_attention(CHUNKED_LAYER, attn_implementation, use_qk_norm=qk_norm)
    assert attn.config.attn_temperature_tuning and attn.chunk_size == CHUNK
    x, positions = inputs()
    got = run_attention(attn, x, positions, chunk=CHUNK)
    expected = reference_attention(attn, x, positions, rope=True, chunk=CHUNK, l2_qk_norm=qk_norm == "l2")
    assert_close(got, expected)


# ---- Scalable-Softmax ---------------------------------------------------------------------------------------------


def ssmax_by_hand(positions: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """(B, nH, S) multipliers s_h * log(n), n = keys seen: pos + 1, or (pos % chunk) + 1 in a chunked layer."""
    rows = []
    for row in positions.tolist():
        seen = [(p % chunk if chunk is not None else p) + 1 for p in row]
        rows.append([[s * math.log(n) for n in seen] for s in SSMAX_S])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    ("layer_idx", "chunk", "tuning"),
    [(NOPE_LAYER, None, False), (NOPE_LAYER, None, True), (CHUNKED_LAYER, CHUNK, False), (CHUNKED_LAYER, CHUNK, True)],
    ids=["nope", "nope+tuning", "chunked", "chunked+tuning"],
)
def test_scalable_softmax_query_scale_matches_per_head_s_times_log_keys_seen(layer_idx, chunk, tuning):
    attn = make_attention(layer_idx, use_scalable_softmax=True, attn_temperature_tuning=tuning)
    positions = torch.arange(30)[None]
    scale = attn.query_scale(positions)
    assert scale.shape == (1, 30, HEADS, 1)
    expected = ssmax_by_hand(positions, chunk)  # (1, nH, S)
    if tuning and layer_idx == NOPE_LAYER:  # temperature tuning multiplies in, on NoPE layers only
        expected = expected * torch.tensor([temperature_by_hand(p) for p in range(30)], dtype=torch.float64)
    assert_close(scale[..., 0].transpose(1, 2), expected, tol=1e-6)


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
def test_scalable_softmax_full_nope_layer_output_matches_float64_reference(attn_implementation):
    attn = make_attention(
        NOPE_LAYER, attn_implementation, use_qk_norm="none", use_scalable_softmax=True, attn_temperature_tuning=False
    )
    x, positions = inputs()
    got = run_attention(attn, x, positions, chunk=None)
    expected = reference_attention(
        attn, x, positions, rope=False, chunk=None, logit_multiplier=ssmax_by_hand(positions, None)
    )
    assert_close(got, expected)


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("qk_norm", ["none", "l2"])
def test_scalable_softmax_chunked_rope_layer_output_matches_float64_reference(attn_implementation, qk_norm):
    attn = make_attention(CHUNKED_LAYER, attn_implementation, use_qk_norm=qk_norm, use_scalable_softmax=True)
    x, positions = inputs()
    got = run_attention(attn, x, positions, chunk=CHUNK)
    expected = reference_attention(
        attn,
        x,
        positions,
        rope=True,
        chunk=CHUNK,
        logit_multiplier=ssmax_by_hand(positions, CHUNK),
        l2_qk_norm=qk_norm == "l2",
    )
    assert_close(got, expected)


def test_rope_reference_rotation_is_a_norm_preserving_pair_rotation():
    """Sanity check of the test's own RoPE: pair norms are unchanged and position 0 is the identity."""
    x = torch.randn(1, 5, 1, HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rotated = rope_pairs64(x, torch.arange(5)[None])
    pair_norm = x.unflatten(-1, (-1, 2)).norm(dim=-1)
    assert torch.allclose(rotated.unflatten(-1, (-1, 2)).norm(dim=-1), pair_norm)
    assert torch.equal(rotated[:, 0], x[:, 0])
    # pair 0 at position 1 turns by exactly 1 radian
    expected = torch.tensor([math.cos(1) * x[0, 1, 0, 0] - math.sin(1) * x[0, 1, 0, 1]], dtype=torch.float64)
    assert torch.allclose(rotated[0, 1, 0, 0:1], expected)
