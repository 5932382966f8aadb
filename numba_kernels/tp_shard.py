"""TPShard: one tensor-parallel rank's share of GPT-2 on its GPU, the inner of ``mpi_tp`` with ``inner="numba"``.

The same step as ``NumbaBackend`` (``backend.py``), on a rank's shard
(``mpi_tp.shard.ShardWeights``, handed over on the host) instead of the whole
model, and with the reductions of Megatron's tensor parallelism in between:

- the vocabulary-parallel embedding on the host: this rank's rows of the
  token table where it owns the token, zeros elsewhere, ``comm.reduce_sum``,
  then the position rows; uploaded once a step;
- c_attn and c_fc are column-parallel: this rank's heads and MLP units, with
  their epilogues fused as in the backend (K/V store into this rank's heads'
  slots, GELU);
- attn_proj and mlp_proj are row-parallel: a partial product with zero bias
  on the device, [N, C] to the host, ``comm.reduce_sum`` (rank order, the
  same bits on every rank), the bias, back to the device, the residual add;
- the LM head gives this rank's vocabulary columns [L, V_r] on the host.

It knows ``comm`` only as an object with ``reduce_sum`` (``mpi_tp.comm.TPComm``),
so this package still imports ``reference`` alone. ``mpi_tp.backend.shard_factory``
puts rank r on GPU r mod the GPUs it sees before building it. With one rank
it is bitwise ``NumbaBackend``: (acc + 0) + b == acc + b. KV: slots only, as
the backend.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from numba_kernels import elementwise as ew
from numba_kernels.attention_chunked import attention, partials_shape
from numba_kernels.backend import SIMULATOR_LOCK
from numba_kernels.device import require_cuda, simulated
from numba_kernels.dispatch import Dispatch
from numba_kernels.epilogue import GELU, KV
from numba_kernels.shuffle import move_slots
from reference.config import GPTConfig
from reference.kv import KVShape
from reference.lanes import Rows


class TPShard:
    """The ``mpi_tp.model.Shard`` protocol on a GPU: ``TPShard(config, shard_weights, kv, comm)``."""

    def __init__(self, config: GPTConfig, shard, kv: KVShape, comm, dispatch: Dispatch | None = None) -> None:
        require_cuda()
        if kv.block_size != config.n_ctx:
            raise ValueError(f"the numba tensor-parallel shard keeps KV in slots of n_ctx {config.n_ctx} positions, got "
                             f"blocks of {kv.block_size}; use inner='numpy' for paged KV")  # fmt: skip
        self.config, self.w, self.comm, self.kv = config, shard, comm, kv
        self.dispatch = dispatch or Dispatch()
        self.blocks = [device_block(b) for b in shard.blocks]
        self.ln_f = pair(shard.ln_f.g, shard.ln_f.b)
        self.head = pair(shard.head_w, shard.head_zero)  # [C, V_r], [V_r]
        hp, d = shard.n_head, config.head_dim
        shape = (config.n_layer, kv.n_blocks, hp, config.n_ctx, d)
        self.k, self.v = cuda.device_array(shape, np.float32), cuda.device_array(shape, np.float32)
        self.slot_lengths = cuda.to_device(np.zeros(kv.n_blocks, np.int32))
        lanes = kv.n_blocks  # a lane a slot at most
        self.last = cuda.device_array((lanes, config.n_embd), np.float32)
        self.logits = cuda.device_array((lanes, shard.head_w.shape[1]), np.float32)
        self._rows = 0
        self._serial = SIMULATOR_LOCK if simulated() else None

    def _workspace(self, n: int) -> None:
        """Activation buffers for at least n rows (grown, never shrunk)."""
        if n > self._rows:
            c, f32, hp, d = self.config.n_embd, np.float32, self.w.n_head, self.config.head_dim
            self._rows = rows = max(n, self.kv.n_blocks, self.config.n_ctx)
            self.x, self.h, self.y = (cuda.device_array((rows, c), f32) for _ in range(3))
            self.qkv = cuda.device_array((rows, 3 * hp * d), f32)
            self.a = cuda.device_array((rows, hp * d), f32)
            self.f = cuda.device_array((rows, self.w.blocks[0].c_fc.w.shape[1]), f32)
            self.partials = cuda.device_array(partials_shape(rows, hp, self.config.n_ctx, d), f32)

    def embed(self, rows: Rows) -> np.ndarray:
        """VocabParallelEmbedding and the position rows, on the host: -> [N, C]."""
        w, tokens = self.w, rows.tokens
        if w.vocab_parallel:
            owned = (tokens >= w.vocab_lo) & (tokens < w.vocab_hi)  # [N]
            x = w.wte[np.where(owned, tokens - w.vocab_lo, 0)]  # [N, C]
            x[~owned] = 0.0
            x = self.comm.reduce_sum(x)  # only the owning rank adds a nonzero row: exact
        else:
            x = w.wte[tokens]
        return x + w.wpe[rows.positions]  # [N, C]

    def row_parallel(self, y, layer, x) -> None:
        """x += reduce_sum(y) + b: y [N, C] this rank's partial product on the device."""
        total = self.comm.reduce_sum(y.copy_to_host()) + layer.b  # [N, C], the same bits on every rank
        y.copy_to_device(np.ascontiguousarray(total, np.float32))
        ew.residual_add(x, y)

    def step(self, rows: Rows) -> np.ndarray:
        """This rank's share of the step: -> [L, V_r] logits of each lane's last row, on the host."""
        if self._serial is not None:
            with self._serial:
                return self._step(rows)
        return self._step(rows)

    def _step(self, rows: Rows) -> np.ndarray:
        n, n_lanes, gemm, linear = len(rows.tokens), len(rows.last), self.dispatch.gemm, self.dispatch.linear
        eps = self.config.layer_norm_epsilon
        self._workspace(n)
        ints = cuda.to_device(np.concatenate([rows.positions, rows.blocks, rows.lengths, rows.last]).astype(np.int32))
        positions, slots, lengths = (ints[i * n : (i + 1) * n] for i in range(3))
        x, h, qkv, a, y, f = self.x[:n], self.h[:n], self.qkv[:n], self.a[:n], self.y[:n], self.f[:n]
        x.copy_to_device(np.ascontiguousarray(self.embed(rows), np.float32))
        longest = int(rows.lengths.max())
        for i, (block, host) in enumerate(zip(self.blocks, self.w.blocks, strict=True)):
            ew.layer_norm(x, *block["ln_1"], eps, h)  # [N, C]
            linear(h, *block["c_attn"], qkv, KV, (self.k[i], self.v[i], slots, positions, self.slot_lengths))
            attention(qkv, self.k[i], self.v[i], slots, lengths, a, self.partials, longest)  # [N, Hp * D]
            self.row_parallel(gemm(a, *block["attn_proj"], y), host.attn_proj, x)  # [N, Hp * D] -> [N, C]
            ew.layer_norm(x, *block["ln_2"], eps, h)
            linear(h, *block["c_fc"], f, GELU)  # [N, C] -> [N, M]
            self.row_parallel(gemm(f, *block["mlp_proj"], y), host.mlp_proj, x)  # [N, M] -> [N, C]
        if self.head[0].shape[1] == 0:  # a replicated head lives on rank 0 only
            return np.zeros((n_lanes, 0), np.float32)
        last = ew.take_rows(x, ints[3 * n :], self.last[:n_lanes])  # [L, C]
        h = ew.layer_norm(last, *self.ln_f, eps, self.h[:n_lanes])
        return gemm(h, *self.head, self.logits[:n_lanes]).copy_to_host()  # [L, V_r]

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        move_slots(self.k, self.v, self.slot_lengths, src, dst, lengths)


def pair(a: np.ndarray, b: np.ndarray) -> tuple:
    return cuda.to_device(a), cuda.to_device(b)


def device_block(block) -> dict[str, tuple]:
    """A ShardBlock's weights on the device; the row-parallel layers with their zero bias (the bias comes after
    the reduction, on the host)."""
    return {"ln_1": pair(block.ln_1.g, block.ln_1.b), "ln_2": pair(block.ln_2.g, block.ln_2.b),
            "c_attn": pair(block.c_attn.w, block.c_attn.b), "c_fc": pair(block.c_fc.w, block.c_fc.b),
            "attn_proj": pair(block.attn_proj.w, block.attn_proj.zero),
            "mlp_proj": pair(block.mlp_proj.w, block.mlp_proj.zero)}  # fmt: skip
