"""GPT-2 forward passes: a whole sequence, the prefill of one request, and the
batched decode step over KV slots.

Shapes: T tokens of one request, B requests in a decode step, C = n_embd,
H = n_head, D = head_dim, V = vocab_size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from reference import invariant, ops
from reference.config import GPTConfig
from reference.kv import KVSlots
from reference.weights import Block, GPT2Weights, Linear


def attention_qkv(x: np.ndarray, block: Block, n_head: int, eps: float):
    h = ops.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [T, C]
    qkv = ops.linear(h, block.c_attn.w, block.c_attn.b)  # [T, C] -> [T, 3C]
    q, k, v = np.split(qkv, 3, axis=-1)  # 3 x [T, C]
    return ops.split_heads(q, n_head), ops.split_heads(k, n_head), ops.split_heads(v, n_head)  # 3 x [H, T, D]


def block_tail(x: np.ndarray, a: np.ndarray, block: Block, eps: float) -> np.ndarray:
    """Attention output projection, residual, then the MLP with its residual."""
    x = x + ops.linear(ops.merge_heads(a), block.attn_proj.w, block.attn_proj.b)  # [T, C]
    h = ops.layer_norm(x, block.ln_2.g, block.ln_2.b, eps)  # [T, C]
    h = ops.gelu(ops.linear(h, block.c_fc.w, block.c_fc.b))  # [T, C] -> [T, 4C]
    return x + ops.linear(h, block.mlp_proj.w, block.mlp_proj.b)  # [T, 4C] -> [T, C]


def forward(weights: GPT2Weights, config: GPTConfig, tokens: np.ndarray) -> np.ndarray:
    """Logits of every position of one sequence, no cache: [T] -> [T, V]."""
    tokens = np.asarray(tokens)
    x = weights.wte[tokens] + weights.wpe[np.arange(len(tokens))]  # [T, C]
    for block in weights.blocks:
        q, k, v = attention_qkv(x, block, config.n_head, config.layer_norm_epsilon)
        x = block_tail(x, ops.causal_attention(q, k, v), block, config.layer_norm_epsilon)
    x = ops.layer_norm(x, weights.ln_f.g, weights.ln_f.b, config.layer_norm_epsilon)  # [T, C]
    return x @ weights.head.T  # [T, C] @ [C, V] -> [T, V]


def as_is(w: np.ndarray) -> np.ndarray:
    return w


@dataclass(frozen=True, slots=True)
class DecodeOps:
    """The four operations of a decode step that see more than one request.

    ``prepare`` turns a [K, N] weight into the form ``linear`` reads fastest
    (the invariant kernels pack it into column tiles); it runs once per weight,
    when a backend is built. ``linear`` also takes a plain [K, N] array.
    """

    linear: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    layer_norm: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    gelu: Callable[[np.ndarray], np.ndarray]
    attention: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    prepare: Callable[[np.ndarray], object] = as_is


def blas_decode_attention(q, k_cache, v_cache, slots, lengths):
    """NumPy decode attention, request by request: [B, H, D] -> [B, H, D]."""
    out = np.empty_like(q)
    for r, (s, n) in enumerate(zip(slots, lengths)):
        k, v = k_cache[s, :, :n], v_cache[s, :, :n]  # [H, n, D]
        scores = np.einsum("hd,htd->ht", q[r], k) / np.float32(np.sqrt(q.shape[-1]))  # [H, n]
        out[r] = np.einsum("ht,htd->hd", ops.softmax(scores), v)  # [H, D]
    return out


INVARIANT_OPS = DecodeOps(
    invariant.matmul_rows, invariant.layer_norm_rows, invariant.gelu_rows, invariant.decode_attention,
    prepare=invariant.pack_weight,
)  # fmt: skip
BLAS_OPS = DecodeOps(ops.linear, ops.layer_norm, ops.gelu, blas_decode_attention)


def prepare_weights(weights: GPT2Weights, dops: DecodeOps) -> GPT2Weights:
    """``weights`` with every block's linear weights passed through ``dops.prepare``; the rest shared."""

    def prepared(layer: Linear) -> Linear:
        return Linear(dops.prepare(layer.w), layer.b)

    blocks = [
        replace(b, c_attn=prepared(b.c_attn), attn_proj=prepared(b.attn_proj), c_fc=prepared(b.c_fc),
                mlp_proj=prepared(b.mlp_proj))
        for b in weights.blocks
    ]  # fmt: skip
    return replace(weights, blocks=blocks)


def prefill(weights: GPT2Weights, config: GPTConfig, cache: KVSlots, slot: int, tokens: np.ndarray,
            head: Linear | None = None, dops: DecodeOps = BLAS_OPS) -> np.ndarray:  # fmt: skip
    """Run a prompt, store its K and V in ``slot``, return the last position's logits [V].

    A prefill always runs one request on its own, in fused and serial decoding
    alike, so any kernel may do its matrix products: no other request can
    change its rounding. The linear weights, and ``head`` (the LM head as a
    [C, V] linear layer; the tied ``wte`` when None), are in the form
    ``dops.prepare`` makes; a backend passes the kernels it decodes with.
    """
    tokens = np.asarray(tokens)
    n, eps, n_head = len(tokens), config.layer_norm_epsilon, config.n_head
    x = weights.wte[tokens] + weights.wpe[np.arange(n)]  # [T, C]
    for i, block in enumerate(weights.blocks):
        h = dops.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [T, C]
        qkv = dops.linear(h, block.c_attn.w, block.c_attn.b)  # [T, C] -> [T, 3C]
        q, k, v = (ops.split_heads(t, n_head) for t in np.split(qkv, 3, axis=-1))  # 3 x [H, T, D]
        cache.k[i, slot, :, :n] = k
        cache.v[i, slot, :, :n] = v
        a = ops.merge_heads(ops.causal_attention(q, k, v))  # [H, T, D] -> [T, C]
        x = x + dops.linear(np.ascontiguousarray(a), block.attn_proj.w, block.attn_proj.b)  # [T, C]
        h = dops.layer_norm(x, block.ln_2.g, block.ln_2.b, eps)  # [T, C]
        h = dops.gelu(dops.linear(h, block.c_fc.w, block.c_fc.b))  # [T, C] -> [T, 4C]
        x = x + dops.linear(h, block.mlp_proj.w, block.mlp_proj.b)  # [T, 4C] -> [T, C]
    x = dops.layer_norm(x[-1:], weights.ln_f.g, weights.ln_f.b, eps)  # [1, C]
    if head is None:
        return (x @ weights.head.T)[0]  # [1, C] @ [C, V] -> [V]
    return dops.linear(x, head.w, head.b)[0]  # [1, C] @ [C, V] -> [V]


def decode(
    weights: GPT2Weights,
    config: GPTConfig,
    cache: KVSlots,
    slots: np.ndarray,
    tokens: np.ndarray,
    positions: np.ndarray,
    head: Linear,
    dops: DecodeOps = INVARIANT_OPS,
) -> np.ndarray:
    """One new token for each of B requests, each at its own position: -> [B, V].

    Request b writes its K and V at ``positions[b]`` of slot ``slots[b]`` and
    attends over positions 0..positions[b] of that slot. ``head`` is the LM
    head as a [C, V] linear layer. The linear weights may be in the form
    ``dops.prepare`` makes (see ``prepare_weights``).
    """
    eps, n_head = config.layer_norm_epsilon, config.n_head
    lengths = positions + 1
    x = weights.wte[tokens] + weights.wpe[positions]  # [B, C]
    for i, block in enumerate(weights.blocks):
        h = dops.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [B, C]
        qkv = dops.linear(h, block.c_attn.w, block.c_attn.b)  # [B, C] -> [B, 3C]
        q, k, v = (t.reshape(len(slots), n_head, -1) for t in np.split(qkv, 3, axis=-1))  # 3 x [B, H, D]
        cache.k[i, slots, :, positions] = k
        cache.v[i, slots, :, positions] = v
        a = dops.attention(np.ascontiguousarray(q), cache.k[i], cache.v[i], slots, lengths)  # [B, H, D]
        x = x + dops.linear(a.reshape(len(slots), -1), block.attn_proj.w, block.attn_proj.b)  # [B, C]
        h = dops.layer_norm(x, block.ln_2.g, block.ln_2.b, eps)  # [B, C]
        h = dops.gelu(dops.linear(h, block.c_fc.w, block.c_fc.b))  # [B, C] -> [B, 4C]
        x = x + dops.linear(h, block.mlp_proj.w, block.mlp_proj.b)  # [B, 4C] -> [B, C]
    x = dops.layer_norm(x, weights.ln_f.g, weights.ln_f.b, eps)  # [B, C]
    return dops.linear(x, head.w, head.b)  # [B, C] @ [C, V] -> [B, V]
