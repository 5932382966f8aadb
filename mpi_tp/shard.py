"""Megatron-style sharding of GPT-2 weights for one rank of a tensor-parallel world.

Each block is split so that a rank needs one reduction after the attention and
one after the MLP, and nothing in between:

    ColumnParallelLinear   c_attn, c_fc     out columns split; each rank computes
                                            its own heads / its own MLP units
    RowParallelLinear      attn_proj,       in rows split to match; each rank
                           mlp_proj         gives a partial sum, the reduction
                                            adds them, then the bias (once)

``c_attn`` holds q, k and v side by side as [C, 3C]; rank r takes the columns
of heads r*Hp .. (r+1)*Hp - 1 from each of q, k and v (Hp = n_head / N heads
per partition), so its q, k, v are those of its own heads and its attention
needs nothing from other ranks. Layer norms and position embeddings are small
and replicated.

The token embedding and the LM head (tied in GPT-2) are either
vocabulary-parallel (rank r keeps vocabulary rows lo_r .. hi_r - 1; the
embedding lookup is a reduction in which only the owning rank contributes, and
the logits are gathered on rank 0) or replicated (every rank keeps the whole
table and rank 0 alone computes the logits). See ``mpi_tp/__init__.py`` for
the choice and its measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference import GPT2Weights, GPTConfig
from reference.weights import LayerNorm


@dataclass(slots=True)
class ColumnParallelLinear:
    w: np.ndarray  # [n_in, n_out / N]
    b: np.ndarray  # [n_out / N]


@dataclass(slots=True)
class RowParallelLinear:
    w: np.ndarray  # [n_in / N, n_out]
    b: np.ndarray  # [n_out], added once, after the reduction
    zero: np.ndarray  # [n_out] zeros: the bias of the partial product


@dataclass(slots=True)
class ShardBlock:
    ln_1: LayerNorm
    c_attn: ColumnParallelLinear  # [C, 3 * Hp * D]: this rank's q | k | v
    attn_proj: RowParallelLinear  # [Hp * D, C]
    ln_2: LayerNorm
    c_fc: ColumnParallelLinear  # [C, d_mlp / N]
    mlp_proj: RowParallelLinear  # [d_mlp / N, C]


@dataclass(slots=True)
class ShardWeights:
    rank: int
    world: int
    n_head: int  # heads per partition, Hp
    vocab_parallel: bool
    vocab_lo: int  # this rank's vocabulary rows are vocab_lo .. vocab_hi - 1
    vocab_hi: int
    wte: np.ndarray  # [vocab_hi - vocab_lo, C]
    head_w: np.ndarray  # [C, V_r], the LM head, contiguous for the decode matmul ([C, 0] off rank 0 if replicated)
    head_zero: np.ndarray  # [V_r]
    wpe: np.ndarray  # [n_ctx, C]
    blocks: list[ShardBlock]
    ln_f: LayerNorm


def check_world(config: GPTConfig, world: int) -> None:
    """Raise ValueError when ``world`` ranks cannot split this model evenly."""
    if world < 1:
        raise ValueError(f"the tensor-parallel world needs at least 1 rank, got {world}")
    if config.n_head % world:
        raise ValueError(
            f"n_head {config.n_head} is not divisible by the {world} tensor-parallel ranks; "
            f"use a rank count that divides {config.n_head}"
        )
    if config.d_mlp % world:
        raise ValueError(f"the MLP width d_mlp {config.d_mlp} is not divisible by the {world} tensor-parallel ranks")
    if config.vocab_size < world:
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the {world} tensor-parallel ranks")


def vocab_bounds(vocab_size: int, world: int) -> np.ndarray:
    """[world + 1] row bounds: rank r owns vocabulary rows bounds[r] .. bounds[r + 1] - 1.

    The first ``vocab_size % world`` ranks take one row more (GPT-2's 50257 is odd).
    """
    sizes = np.full(world, vocab_size // world, np.int64)
    sizes[: vocab_size % world] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def shard_weights(config: GPTConfig, weights: GPT2Weights, rank: int, world: int, vocab_parallel: bool = True) -> ShardWeights:
    """Rank ``rank``'s shard, as fresh contiguous arrays: the full weights can be dropped afterwards."""
    check_world(config, world)
    c, hp, m = config.n_embd, config.n_head // world, config.d_mlp // world
    heads = slice(rank * hp * config.head_dim, (rank + 1) * hp * config.head_dim)  # columns of this rank's heads
    units = slice(rank * m, (rank + 1) * m)  # this rank's MLP units

    def own(a: np.ndarray) -> np.ndarray:  # a copy: a view of a row slice would keep the whole array alive
        return np.array(a, dtype=np.float32, order="C", copy=True)

    def copy_norm(n: LayerNorm) -> LayerNorm:
        return LayerNorm(own(n.g), own(n.b))

    blocks = []
    for block in weights.blocks:
        q, k, v = np.split(block.c_attn.w, 3, axis=1)  # 3 x [C, C]
        qb, kb, vb = np.split(block.c_attn.b, 3)  # 3 x [C]
        blocks.append(
            ShardBlock(
                ln_1=copy_norm(block.ln_1),
                c_attn=ColumnParallelLinear(
                    own(np.concatenate([q[:, heads], k[:, heads], v[:, heads]], axis=1)),  # [C, 3 * Hp * D]
                    own(np.concatenate([qb[heads], kb[heads], vb[heads]])),  # [3 * Hp * D]
                ),
                attn_proj=RowParallelLinear(
                    own(block.attn_proj.w[heads]), own(block.attn_proj.b), np.zeros(c, np.float32)
                ),  # [Hp * D, C]
                ln_2=copy_norm(block.ln_2),
                c_fc=ColumnParallelLinear(own(block.c_fc.w[:, units]), own(block.c_fc.b[units])),  # [C, d_mlp / N]
                mlp_proj=RowParallelLinear(
                    own(block.mlp_proj.w[units]), own(block.mlp_proj.b), np.zeros(c, np.float32)
                ),  # [d_mlp / N, C]
            )
        )
    bounds = vocab_bounds(config.vocab_size, world) if vocab_parallel else np.array([0, config.vocab_size])
    lo, hi = (int(bounds[rank]), int(bounds[rank + 1])) if vocab_parallel else (0, config.vocab_size)
    head = weights.head[lo:hi] if vocab_parallel or rank == 0 else weights.head[:0]  # [V_r, C]; replicated: rank 0 only
    return ShardWeights(
        rank=rank,
        world=world,
        n_head=hp,
        vocab_parallel=vocab_parallel,
        vocab_lo=lo,
        vocab_hi=hi,
        wte=own(weights.wte[lo:hi]),
        head_w=own(head.T),  # [C, V_r]
        head_zero=np.zeros(len(head), np.float32),
        wpe=own(weights.wpe),
        blocks=blocks,
        ln_f=copy_norm(weights.ln_f),
    )
