"""One rank's share of GPT-2: the ragged step on a shard, with its reductions.

The same step as ``reference.model.step``, line for line, except that

- the token embedding is a ``VocabParallelEmbedding`` (or a replicated table),
- c_attn and c_fc are column-parallel: their outputs are this rank's heads and
  MLP units, and the attention runs on this rank's heads and KV blocks only,
- attn_proj and mlp_proj are row-parallel: a partial product, the reduction,
  then the bias,
- the LM head gives this rank's vocabulary columns (all of them on rank 0 and
  none elsewhere when it is replicated).

It uses the batch-invariant kernels of ``reference.invariant`` (through
``reference.model.INVARIANT_OPS``, its weights packed once by
``StepOps.prepare``; ``attention`` is ``attention_rows``, which reads each
lane's positions through its block table) and the reduction sums in rank
order (see ``mpi_tp/comm.py``). So a lane's logits do not depend on the other
lanes of its step, on the chunks its prompt was prefilled in, or on where its
blocks lie: TP fused == TP serial, bitwise.

Shapes: N rows of a step, L lanes, C = n_embd, Hp = heads per partition,
D = head_dim, M = d_mlp / N_ranks, V_r = this rank's vocabulary columns.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np

from mpi_tp.comm import TPComm
from mpi_tp.shard import ColumnParallelLinear, RowParallelLinear, ShardBlock, ShardWeights
from reference import GPTConfig
from reference.kv import KVBlocks, KVShape
from reference.lanes import Rows
from reference.model import INVARIANT_OPS, StepOps


class Shard(Protocol):
    """What the tensor-parallel backend needs from the math on one rank (the ``inner``).

    Constructed as ``Shard(config, shard_weights, kv, comm)`` with ``kv`` a
    ``KVShape``; returns host NumPy arrays of this rank's logit columns and
    calls ``comm.reduce_sum`` on host arrays [N, C] after each RowParallelLinear.
    """

    def step(self, rows: Rows) -> np.ndarray: ...  # [L, V_r]: each lane's last row

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None: ...


class NumpyShard:
    """The CPU inner: the batch-invariant Numba kernels, KV blocks of this rank's heads."""

    def __init__(self, config: GPTConfig, shard: ShardWeights, kv: KVShape, comm: TPComm,
                 sops: StepOps = INVARIANT_OPS) -> None:  # fmt: skip
        self.config = config
        self.w = shard
        self.comm = comm
        self.sops = sops
        # The KV cache of Hp heads has the layout of a model with Hp heads of the same head_dim.
        local = config.with_(n_head=shard.n_head, n_embd=shard.n_head * config.head_dim)
        self.cache = KVBlocks(local, kv)  # k, v: [n_layer, n_blocks, Hp, block_size, D]
        self.blocks = [prepare_block(block, sops.prepare) for block in shard.blocks]  # packed once
        self.head = sops.prepare(shard.head_w)  # [C, V_r]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """VocabParallelEmbedding: [N] -> [N, C]; only the owning rank adds a nonzero row, so the sum is exact."""
        w = self.w
        if not w.vocab_parallel:
            return w.wte[tokens]  # [N, C]
        owned = (tokens >= w.vocab_lo) & (tokens < w.vocab_hi)  # [N]
        rows = w.wte[np.where(owned, tokens - w.vocab_lo, 0)]  # [N, C]
        rows[~owned] = 0.0
        return self.comm.reduce_sum(rows)  # [N, C]

    def row_parallel(self, x: np.ndarray, layer: RowParallelLinear) -> np.ndarray:
        """[N, K / N_ranks] -> [N, C]: partial product, reduction over ranks, then the bias once."""
        return self.comm.reduce_sum(self.sops.linear(x, layer.w, layer.zero)) + layer.b

    def column_parallel(self, x: np.ndarray, layer: ColumnParallelLinear) -> np.ndarray:
        return self.sops.linear(x, layer.w, layer.b)  # [N, C] -> [N, K / N_ranks]

    def step(self, rows: Rows) -> np.ndarray:
        """``reference.model.step`` on this rank's heads and units: -> [L, V_r] logits of each lane's last row."""
        w, d, eps, n = self.w, self.sops, self.config.layer_norm_epsilon, len(rows.tokens)
        blocks, offsets, lengths, lane = rows.blocks, rows.offsets, rows.lengths, rows.lane  # [N] each
        table = rows.block_table  # [L, M]
        x = self.embed(rows.tokens) + w.wpe[rows.positions]  # [N, C]
        for i, block in enumerate(self.blocks):
            h = d.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [N, C]
            qkv = self.column_parallel(h, block.c_attn)  # [N, C] -> [N, 3 * Hp * D]
            q, k, v = (t.reshape(n, w.n_head, -1) for t in np.split(qkv, 3, axis=-1))  # 3 x [N, Hp, D]
            self.cache.k[i, blocks, :, offsets] = k
            self.cache.v[i, blocks, :, offsets] = v
            a = d.attention(np.ascontiguousarray(q), self.cache.k[i], self.cache.v[i], table, lane, lengths)  # [N, Hp, D]
            x = x + self.row_parallel(a.reshape(n, -1), block.attn_proj)  # [N, Hp * D] -> [N, C]
            h = d.layer_norm(x, block.ln_2.g, block.ln_2.b, eps)  # [N, C]
            h = d.gelu(self.column_parallel(h, block.c_fc))  # [N, C] -> [N, M]
            x = x + self.row_parallel(h, block.mlp_proj)  # [N, M] -> [N, C]
        x = d.layer_norm(np.ascontiguousarray(x[rows.last]), w.ln_f.g, w.ln_f.b, eps)  # [L, C]
        return d.linear(x, self.head, w.head_zero)  # [L, C] @ [C, V_r] -> [L, V_r]

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        self.cache.move(src, dst, lengths)


def prepare_block(block: ShardBlock, prepare) -> ShardBlock:
    """``block`` with its four weights in the form ``linear`` reads fastest; the rest shared."""

    def prepared(layer):
        return replace(layer, w=prepare(layer.w))

    return replace(block, c_attn=prepared(block.c_attn), attn_proj=prepared(block.attn_proj),
                   c_fc=prepared(block.c_fc), mlp_proj=prepared(block.mlp_proj))  # fmt: skip
