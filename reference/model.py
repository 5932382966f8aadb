"""GPT-2 forward passes: a whole sequence without a cache (the teaching path), and
the ragged step over KV blocks that every engine runs.

Shapes: T tokens of one sequence, N rows of a step (the new tokens of all its
lanes), L lanes, C = n_embd, H = n_head, D = head_dim, V = vocab_size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from reference import invariant, ops
from reference.config import GPTConfig
from reference.kv import KVBlocks
from reference.lanes import Rows
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
class StepOps:
    """The four operations of a step that see more than one row.

    ``prepare`` turns a [K, N] weight into the form ``linear`` reads fastest
    (the invariant kernels pack it into column tiles); it runs once per weight,
    when a backend is built. ``linear`` also takes a plain [K, N] array.
    ``attention(q, k_cache, v_cache, block_table, lane, lengths)`` is
    ``invariant.attention_rows``'s contract.
    """

    linear: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    layer_norm: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    gelu: Callable[[np.ndarray], np.ndarray]
    attention: Callable[..., np.ndarray]
    prepare: Callable[[np.ndarray], object] = as_is


def blas_attention_rows(q, k_cache, v_cache, block_table, lane, lengths):
    """NumPy attention, row by row, through each lane's block table: [N, H, D] -> [N, H, D]."""
    out = np.empty_like(q)
    block_size = k_cache.shape[2]
    for r, (i, n) in enumerate(zip(lane, lengths)):
        blocks = block_table[i, : -(-n // block_size)]  # [m]
        k = k_cache[blocks].transpose(1, 0, 2, 3).reshape(q.shape[1], -1, q.shape[2])[:, :n]  # [H, n, D]
        v = v_cache[blocks].transpose(1, 0, 2, 3).reshape(q.shape[1], -1, q.shape[2])[:, :n]  # [H, n, D]
        scores = np.einsum("hd,htd->ht", q[r], k) / np.float32(np.sqrt(q.shape[-1]))  # [H, n]
        out[r] = np.einsum("ht,htd->hd", ops.softmax(scores), v)  # [H, D]
    return out


def blas_decode_attention(q, k_cache, v_cache, slots, lengths):
    """Slot-layout decode attention with NumPy, one query per request: [B, H, D] -> [B, H, D]."""
    slots = np.asarray(slots, np.int64)
    return blas_attention_rows(q, k_cache, v_cache, slots[:, None], np.arange(len(slots)), np.asarray(lengths))


INVARIANT_OPS = StepOps(
    invariant.matmul_rows, invariant.layer_norm_rows, invariant.gelu_rows, invariant.attention_rows,
    prepare=invariant.pack_weight,
)  # fmt: skip
BLAS_OPS = StepOps(ops.linear, ops.layer_norm, ops.gelu, blas_attention_rows)


def prepare_weights(weights: GPT2Weights, sops: StepOps) -> GPT2Weights:
    """``weights`` with every block's linear weights passed through ``sops.prepare``; the rest shared."""

    def prepared(layer: Linear) -> Linear:
        return Linear(sops.prepare(layer.w), layer.b)

    blocks = [
        replace(b, c_attn=prepared(b.c_attn), attn_proj=prepared(b.attn_proj), c_fc=prepared(b.c_fc),
                mlp_proj=prepared(b.mlp_proj))
        for b in weights.blocks
    ]  # fmt: skip
    return replace(weights, blocks=blocks)


def step(weights: GPT2Weights, config: GPTConfig, cache: KVBlocks, rows: Rows, head: Linear,
         sops: StepOps = INVARIANT_OPS) -> np.ndarray:  # fmt: skip
    """One ragged step: every row's K and V into its lane's blocks, then the logits of each lane's last row.

    Row r is token ``rows.tokens[r]`` at position ``rows.positions[r]``; it
    attends over positions 0 .. positions[r] of its lane, which the rows
    before it in this step (a prefill chunk) or earlier steps wrote. ``head``
    is the LM head as a [C, V] linear layer; the linear weights may be in the
    form ``sops.prepare`` makes (see ``prepare_weights``). With the invariant
    ops every row is computed from its own inputs in a fixed order, so a
    lane's logits are the same bits alone, beside other lanes, prefilled in
    one chunk or many, or fed one token at a time. -> [L, V]
    """
    eps, n_head, n = config.layer_norm_epsilon, config.n_head, len(rows.tokens)
    blocks, offsets, lengths = rows.blocks, rows.offsets, rows.lengths  # [N] each
    x = weights.wte[rows.tokens] + weights.wpe[rows.positions]  # [N, C]
    for i, block in enumerate(weights.blocks):
        h = sops.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [N, C]
        qkv = sops.linear(h, block.c_attn.w, block.c_attn.b)  # [N, C] -> [N, 3C]
        q, k, v = (t.reshape(n, n_head, -1) for t in np.split(qkv, 3, axis=-1))  # 3 x [N, H, D]
        cache.k[i, blocks, :, offsets] = k
        cache.v[i, blocks, :, offsets] = v
        a = sops.attention(np.ascontiguousarray(q), cache.k[i], cache.v[i], rows.block_table, rows.lane, lengths)
        x = x + sops.linear(a.reshape(n, -1), block.attn_proj.w, block.attn_proj.b)  # [N, H, D] -> [N, C]
        h = sops.layer_norm(x, block.ln_2.g, block.ln_2.b, eps)  # [N, C]
        h = sops.gelu(sops.linear(h, block.c_fc.w, block.c_fc.b))  # [N, C] -> [N, 4C]
        x = x + sops.linear(h, block.mlp_proj.w, block.mlp_proj.b)  # [N, 4C] -> [N, C]
    x = sops.layer_norm(np.ascontiguousarray(x[rows.last]), weights.ln_f.g, weights.ln_f.b, eps)  # [L, C]
    return sops.linear(x, head.w, head.b)  # [L, C] @ [C, V] -> [L, V]
