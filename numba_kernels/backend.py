"""NumbaBackend: the ragged step of ``reference/backend.py`` over device arrays.

The weights are uploaded once; the KV slots live on the device; a step (any
mix of prefill chunks and decode tokens, see ``reference.lanes``) runs from
embedding to logits on the device, and only the logits of each lane's last
token come back to the host. ``plan_rows`` checks the lanes first, as on
every backend.

KV layout: Flover's slots only, one block of n_ctx positions per request
(``KVShape.slots``), so a lane's one block is its slot and the kernels index
K and V as [slot, head, position, d]. Other block sizes (paged KV) are
refused at construction; the NumPy backend reads through a block table.

Order of every reduction: a GEMM output element is summed by one thread over
k ascending, whichever variant dispatch picks; a layer norm is one block per
row, its size fixed by n_embd; attention (version 2, ``attention_chunked``)
splits a row's positions into chunks fixed by head_dim and combines them in
chunk order. Nothing depends on the rows of the launch or the longest lane.

Launches a layer: layer norm, c_attn with the K/V store in its epilogue,
attention (two kernels), attn_proj adding itself into the residual stream,
layer norm, c_fc with GELU in its epilogue, mlp_proj adding itself in: 8
(the first version launched 11). The epilogues give bitwise what the
separate kernels give (``epilogue.py``). So a row's result is a
function of its own token, position and cached K and V: a lane's logits do
not depend on the other lanes of its step, a prompt prefilled in chunks of
any size gives bitwise the logits of the whole prompt at once, and the last
position's logits equal feeding the prompt one token at a time
(``tests/test_backend_contract.py``). They equal the NumPy backend's only to
rounding: the sums run in other orders (and the simulator's ``cuda.fma``
rounds twice).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import numpy as np
from numba import cuda

from numba_kernels import elementwise as ew
from numba_kernels.attention_chunked import attention, partials_shape
from numba_kernels.device import require_cuda, simulated
from numba_kernels.dispatch import Dispatch
from numba_kernels.epilogue import GELU, KV, RESIDUAL
from numba_kernels.shuffle import move_slots
from reference.backend import LaneBackend
from reference.config import GPTConfig
from reference.kv import KVShape, as_kv_shape
from reference.lanes import Lane, plan_rows
from reference.weights import Block, GPT2Weights, LayerNorm, Linear

SIMULATOR_LOCK = threading.Lock()  # the simulator runs one kernel at a time, whatever the thread


def weights_to_device(weights: GPT2Weights) -> tuple[GPT2Weights, Linear]:
    """The same records holding device arrays, and the LM head as a [C, V] linear layer with zero bias."""
    up = cuda.to_device

    def linear(layer: Linear) -> Linear:
        return Linear(up(layer.w), up(layer.b))

    def norm(layer: LayerNorm) -> LayerNorm:
        return LayerNorm(up(layer.g), up(layer.b))

    blocks = [
        Block(norm(b.ln_1), linear(b.c_attn), linear(b.attn_proj), norm(b.ln_2), linear(b.c_fc), linear(b.mlp_proj))
        for b in weights.blocks
    ]
    head = Linear(np.ascontiguousarray(weights.head.T), np.zeros(weights.head.shape[0], np.float32))  # [C, V]
    return GPT2Weights(up(weights.wte), up(weights.wpe), blocks, norm(weights.ln_f)), linear(head)


class Workspace:
    """Activation buffers for up to ``rows`` rows and ``lanes`` lanes; a step uses views [:N] and [:L]."""

    def __init__(self, config: GPTConfig, rows: int, lanes: int) -> None:
        c, f32 = config.n_embd, np.float32
        self.rows = rows
        self.x = cuda.device_array((rows, c), f32)  # the residual stream
        self.h = cuda.device_array((rows, c), f32)  # layer-norm output
        self.qkv = cuda.device_array((rows, 3 * c), f32)
        self.a = cuda.device_array((rows, c), f32)  # attention output, heads merged
        self.y = cuda.device_array((rows, c), f32)  # a projection, before the residual add
        self.f = cuda.device_array((rows, config.d_mlp), f32)  # MLP hidden
        self.partials = cuda.device_array(partials_shape(rows, config.n_head, config.n_ctx, config.head_dim), f32)
        self.last = cuda.device_array((lanes, c), f32)  # each lane's last row
        self.logits = cuda.device_array((lanes, config.vocab_size), f32)


class NumbaBackend(LaneBackend):
    """GPT-2 with Numba CUDA kernels: weights uploaded once, K and V in device slots."""

    def __init__(self, config: GPTConfig, weights: GPT2Weights, n_slots: int | KVShape = 1,
                 dispatch: Dispatch | None = None) -> None:  # fmt: skip
        require_cuda()
        self.kv = as_kv_shape(config, n_slots)
        if self.kv.block_size != config.n_ctx:
            raise ValueError(f"NumbaBackend keeps KV in slots of n_ctx {config.n_ctx} positions, got blocks of "
                             f"{self.kv.block_size}; use the numpy backend for paged KV")  # fmt: skip
        self.config = config
        self.weights = weights
        self.dispatch = dispatch or Dispatch()
        self.device_weights, self.head = weights_to_device(weights)
        shape = (config.n_layer, self.kv.n_blocks, config.n_head, config.n_ctx, config.head_dim)
        self.k = cuda.device_array(shape, np.float32)  # positions past a slot's length are never read
        self.v = cuda.device_array(shape, np.float32)
        self.slot_lengths = cuda.to_device(np.zeros(self.kv.n_blocks, np.int32))  # per-slot state: positions cached
        self.work = Workspace(config, max(self.kv.n_blocks, config.n_ctx), self.kv.n_blocks)  # lanes <= slots
        self._serial = SIMULATOR_LOCK if simulated() else contextlib.nullcontext()  # instances run in threads

    # ------------------------------------------------------------ the protocol

    def step(self, lanes: Sequence[Lane]) -> np.ndarray:
        """One ragged step; -> [L, V] logits of each lane's last token."""
        rows = plan_rows(self.config, self.kv, lanes)
        n, n_lanes = len(rows.tokens), len(rows.last)
        ints = np.concatenate([rows.tokens, rows.positions, rows.blocks, rows.lengths, rows.last]).astype(np.int32)
        with self._serial:
            if n > self.work.rows:  # a step of several long prefill chunks
                self.work = Workspace(self.config, n, self.kv.n_blocks)
            ints = cuda.to_device(ints)  # [4N + L]: one copy
            tokens, positions, slots, lengths = (ints[i * n : (i + 1) * n] for i in range(4))
            x = self._layers(tokens, positions, slots, lengths, int(rows.lengths.max()))  # [N, C]
            return self._logits(ew.take_rows(x, ints[4 * n :], self.work.last[:n_lanes]))

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        """The memory shuffle: copy the first lengths[i] positions of slot src[i] into slot dst[i]."""
        src, dst, lengths = (np.asarray(a, np.int64) for a in (src, dst, lengths))
        self.check_move(src, dst, lengths)
        with self._serial:
            move_slots(self.k, self.v, self.slot_lengths, src, dst, lengths)

    # ------------------------------------------------------------ on the device

    def _layers(self, tokens, positions, slots, lengths, longest: int):
        """The transformer over N rows, storing each row's K and V in its slot: -> x [N, C] on the device."""
        n, dw, linear = len(tokens), self.device_weights, self.dispatch.linear
        w, eps = self.work, self.config.layer_norm_epsilon
        x, h, qkv, a, y, f = w.x[:n], w.h[:n], w.qkv[:n], w.a[:n], w.y[:n], w.f[:n]
        ew.embed(tokens, positions, dw.wte, dw.wpe, x)  # [N, C]
        for i, block in enumerate(dw.blocks):
            ew.layer_norm(x, block.ln_1.g, block.ln_1.b, eps, h)  # [N, C]
            kv = (self.k[i], self.v[i], slots, positions, self.slot_lengths)  # where c_attn's epilogue stores K, V
            linear(h, block.c_attn.w, block.c_attn.b, qkv, KV, kv)  # [N, C] -> [N, 3C]
            attention(qkv, self.k[i], self.v[i], slots, lengths, a, w.partials, longest)  # [N, 3C] -> [N, C]
            linear(a, block.attn_proj.w, block.attn_proj.b, x, RESIDUAL, scratch=y)  # x += a @ w + b: [N, C]
            ew.layer_norm(x, block.ln_2.g, block.ln_2.b, eps, h)  # [N, C]
            linear(h, block.c_fc.w, block.c_fc.b, f, GELU)  # [N, C] -> [N, 4C]
            linear(f, block.mlp_proj.w, block.mlp_proj.b, x, RESIDUAL, scratch=y)  # [N, 4C] -> [N, C]
        return x

    def _logits(self, x) -> np.ndarray:
        """Final layer norm and LM head on the device, logits to the host: x [L, C] -> [L, V]."""
        n, dw = x.shape[0], self.device_weights
        h = ew.layer_norm(x, dw.ln_f.g, dw.ln_f.b, self.config.layer_norm_epsilon, self.work.h[:n])
        return self.dispatch.gemm(h, self.head.w, self.head.b, self.work.logits[:n]).copy_to_host()

    # ------------------------------------------------------------ for tests and tools

    def cached_lengths(self) -> np.ndarray:
        """Positions cached per slot, the per-slot state the shuffle moves: [n_slots]."""
        return self.slot_lengths.copy_to_host()
