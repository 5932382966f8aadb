"""One rank's share of GPT-2: the prefill and the decode step on a shard, with its reductions.

The same forward as ``reference.model``, line for line, except that

- the token embedding is a ``VocabParallelEmbedding`` (or a replicated table),
- c_attn and c_fc are column-parallel: their outputs are this rank's heads and
  MLP units, and the attention runs on this rank's heads and KV slots only,
- attn_proj and mlp_proj are row-parallel: a partial product, the reduction,
  then the bias,
- the LM head gives this rank's vocabulary columns (all of them on rank 0 and
  none elsewhere when it is replicated).

The decode step uses the batch-invariant kernels of ``reference.invariant``
(through ``reference.model.INVARIANT_OPS``, its weights packed once by
``DecodeOps.prepare``) and the reduction sums in rank order (see
``mpi_tp/comm.py``), so a request's logits do not depend on the other requests
in its step: TP fused == TP serial, bitwise. The prefill runs one request
alone and may use BLAS, on the plain weights.

Shapes: T prompt tokens, B requests, C = n_embd, Hp = heads per partition,
D = head_dim, M = d_mlp / N, V_r = this rank's vocabulary columns.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np

from mpi_tp.comm import TPComm
from mpi_tp.shard import ColumnParallelLinear, RowParallelLinear, ShardBlock, ShardWeights
from reference import GPTConfig, KVSlots, ops
from reference.model import INVARIANT_OPS, DecodeOps


class Shard(Protocol):
    """What the tensor-parallel backend needs from the math on one rank (the ``inner``).

    Constructed as ``Shard(config, shard_weights, n_slots, comm)``; returns host
    NumPy arrays of this rank's logit columns and calls ``comm.reduce_sum`` on
    host arrays [n, C] after each RowParallelLinear.
    """

    def prefill(self, slot: int, tokens: np.ndarray) -> np.ndarray: ...  # [T] -> [V_r]

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray: ...  # [B, V_r]

    def move_slots(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None: ...


class NumpyShard:
    """The CPU inner: batch-invariant Numba prefill and decode, KV slots of this rank's heads."""

    def __init__(
        self, config: GPTConfig, shard: ShardWeights, n_slots: int, comm: TPComm, dops: DecodeOps = INVARIANT_OPS
    ) -> None:
        self.config = config
        self.w = shard
        self.comm = comm
        self.dops = dops
        # The KV cache of Hp heads has the layout of a model with Hp heads of the same head_dim.
        local = config.with_(n_head=shard.n_head, n_embd=shard.n_head * config.head_dim)
        self.cache = KVSlots(local, n_slots)  # k, v: [n_layer, n_slots, Hp, n_ctx, D]
        self.decode_blocks = [prepare_block(block, dops.prepare) for block in shard.blocks]  # packed once
        self.decode_head = dops.prepare(shard.head_w)  # [C, V_r]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """VocabParallelEmbedding: [n] -> [n, C]; only the owning rank adds a nonzero row, so the sum is exact."""
        w = self.w
        if not w.vocab_parallel:
            return w.wte[tokens]  # [n, C]
        owned = (tokens >= w.vocab_lo) & (tokens < w.vocab_hi)  # [n]
        rows = w.wte[np.where(owned, tokens - w.vocab_lo, 0)]  # [n, C]
        rows[~owned] = 0.0
        return self.comm.reduce_sum(rows)  # [n, C]

    def row_parallel(self, x: np.ndarray, layer: RowParallelLinear, linear) -> np.ndarray:
        """[n, K / N] -> [n, C]: partial product, reduction over ranks, then the bias once."""
        return self.comm.reduce_sum(linear(x, layer.w, layer.zero)) + layer.b

    @staticmethod
    def column_parallel(x: np.ndarray, layer: ColumnParallelLinear, linear) -> np.ndarray:
        return linear(x, layer.w, layer.b)  # [n, C] -> [n, K / N]

    def prefill(self, slot: int, tokens: np.ndarray) -> np.ndarray:
        """One prompt alone, with the decode kernels (the fastest here; see ``reference.model.prefill``)."""
        w, d, eps, n = self.w, self.dops, self.config.layer_norm_epsilon, len(tokens)
        x = self.embed(tokens) + w.wpe[np.arange(n)]  # [T, C]
        for i, block in enumerate(self.decode_blocks):
            h = d.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [T, C]
            qkv = self.column_parallel(h, block.c_attn, d.linear)  # [T, C] -> [T, 3 * Hp * D]
            q, k, v = (ops.split_heads(t, w.n_head) for t in np.split(qkv, 3, axis=-1))  # 3 x [Hp, T, D]
            self.cache.k[i, slot, :, :n] = k
            self.cache.v[i, slot, :, :n] = v
            a = ops.merge_heads(ops.causal_attention(q, k, v))  # [T, Hp * D]
            x = x + self.row_parallel(np.ascontiguousarray(a), block.attn_proj, d.linear)  # [T, C]
            h = d.layer_norm(x, block.ln_2.g, block.ln_2.b, eps)  # [T, C]
            h = d.gelu(self.column_parallel(h, block.c_fc, d.linear))  # [T, C] -> [T, M]
            x = x + self.row_parallel(h, block.mlp_proj, d.linear)  # [T, M] -> [T, C]
        x = d.layer_norm(x[-1:], w.ln_f.g, w.ln_f.b, eps)  # [1, C]
        return d.linear(x, self.decode_head, w.head_zero)[0]  # [1, C] @ [C, V_r] -> [V_r]

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        w, d, eps, n = self.w, self.dops, self.config.layer_norm_epsilon, len(slots)
        lengths = positions + 1
        x = self.embed(tokens) + w.wpe[positions]  # [B, C]
        for i, block in enumerate(self.decode_blocks):
            h = d.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [B, C]
            qkv = self.column_parallel(h, block.c_attn, d.linear)  # [B, C] -> [B, 3 * Hp * D]
            q, k, v = (t.reshape(n, w.n_head, -1) for t in np.split(qkv, 3, axis=-1))  # 3 x [B, Hp, D]
            self.cache.k[i, slots, :, positions] = k
            self.cache.v[i, slots, :, positions] = v
            a = d.attention(np.ascontiguousarray(q), self.cache.k[i], self.cache.v[i], slots, lengths)  # [B, Hp, D]
            x = x + self.row_parallel(a.reshape(n, -1), block.attn_proj, d.linear)  # [B, Hp * D] -> [B, C]
            h = d.layer_norm(x, block.ln_2.g, block.ln_2.b, eps)  # [B, C]
            h = d.gelu(self.column_parallel(h, block.c_fc, d.linear))  # [B, C] -> [B, M]
            x = x + self.row_parallel(h, block.mlp_proj, d.linear)  # [B, M] -> [B, C]
        x = d.layer_norm(x, w.ln_f.g, w.ln_f.b, eps)  # [B, C]
        return d.linear(x, self.decode_head, w.head_zero)  # [B, C] @ [C, V_r] -> [B, V_r]

    def move_slots(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        self.cache.move(src, dst, lengths)


def prepare_block(block: ShardBlock, prepare) -> ShardBlock:
    """``block`` with its four weights in the form the decode ``linear`` reads fastest; the rest shared."""

    def prepared(layer):
        return replace(layer, w=prepare(layer.w))

    return replace(block, c_attn=prepared(block.c_attn), attn_proj=prepared(block.attn_proj),
                   c_fc=prepared(block.c_fc), mlp_proj=prepared(block.mlp_proj))  # fmt: skip
