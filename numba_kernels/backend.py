"""NumbaBackend: the Backend protocol of ``reference/backend.py`` over device arrays.

The weights are uploaded once; the KV slots live on the device; a prefill or
a fused decode step runs from embedding to logits on the device, and only the
logits come back to the host. Every op computes a row from that row alone,
in an order fixed by the model's sizes and the request's own length (see the
kernels' headers), so a request's logits are bitwise the same whatever shares
its step, and a drop-in for ``reference.NumpyBackend`` in fused decoding.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
from numba import cuda

from numba_kernels import elementwise as ew
from numba_kernels.attention import attention, store_kv
from numba_kernels.device import require_cuda, simulated
from numba_kernels.dispatch import Dispatch
from numba_kernels.shuffle import move_slots
from reference.config import GPTConfig
from reference.kv import KVSlots
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
    """Activation buffers for up to ``rows`` rows (a prompt or a batch); a step uses views [:n]."""

    def __init__(self, config: GPTConfig, rows: int, n_slots: int) -> None:
        c, f32 = config.n_embd, np.float32
        self.x = cuda.device_array((rows, c), f32)  # the residual stream
        self.h = cuda.device_array((rows, c), f32)  # layer-norm output
        self.qkv = cuda.device_array((rows, 3 * c), f32)
        self.a = cuda.device_array((rows, c), f32)  # attention output, heads merged
        self.y = cuda.device_array((rows, c), f32)  # a projection, before the residual add
        self.f = cuda.device_array((rows, config.d_mlp), f32)  # MLP hidden
        self.logits = cuda.device_array((n_slots, config.vocab_size), f32)


class NumbaBackend:
    """GPT-2 with Numba CUDA kernels: weights uploaded once, K and V in device slots."""

    def __init__(self, config: GPTConfig, weights: GPT2Weights, n_slots: int = 1, dispatch: Dispatch | None = None):
        require_cuda()
        if n_slots < 1:
            raise ValueError(f"the KV cache needs at least 1 slot, got {n_slots}")
        self.config = config
        self.weights = weights
        self.n_slots = n_slots
        self.dispatch = dispatch or Dispatch()
        self.device_weights, self.head = weights_to_device(weights)
        shape = (config.n_layer, n_slots, config.n_head, config.n_ctx, config.head_dim)
        self.k = cuda.device_array(shape, np.float32)  # positions past a slot's length are never read
        self.v = cuda.device_array(shape, np.float32)
        self.slot_lengths = cuda.to_device(np.zeros(n_slots, np.int32))  # per-slot state: positions cached
        self.work = Workspace(config, max(n_slots, config.n_ctx), n_slots)
        self._serial = SIMULATOR_LOCK if simulated() else contextlib.nullcontext()  # instances run in threads

    # ------------------------------------------------------------ the protocol

    def prefill(self, slot: int, tokens: np.ndarray) -> np.ndarray:
        """Run one prompt into ``slot``; -> logits of its last position [V]."""
        tokens = np.asarray(tokens, np.int64)
        n = len(tokens)
        self._check_slots(np.array([slot]))
        if not 1 <= n <= self.config.n_ctx:
            raise ValueError(f"a prompt needs 1..{self.config.n_ctx} tokens (n_ctx), got {n}")
        positions = np.arange(n)
        with self._serial:
            x = self._layers(tokens, positions, np.full(n, slot), positions + 1)
            return self._logits(x[n - 1 : n])[0]

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One fused step: token b at positions[b] of slot slots[b]; -> [B, V] logits."""
        slots, tokens, positions = (np.asarray(a, np.int64).reshape(-1) for a in (slots, tokens, positions))
        if not len(slots) == len(tokens) == len(positions):
            raise ValueError(f"decode needs one token and position per slot, got {len(slots)}, {len(tokens)}, "
                             f"{len(positions)}")  # fmt: skip
        if len(slots) == 0:
            return np.zeros((0, self.config.vocab_size), np.float32)
        self._check_slots(slots)
        if len(set(slots.tolist())) != len(slots):
            raise ValueError(f"a decode step takes each slot once, got slots {slots.tolist()}")
        if positions.min() < 0 or positions.max() >= self.config.n_ctx:
            raise ValueError(f"positions must be in 0..{self.config.n_ctx - 1} (n_ctx), got {positions.tolist()}")
        with self._serial:
            return self._logits(self._layers(tokens, positions, slots, positions + 1))

    def move_slots(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """The memory shuffle: copy the first lengths[i] positions (all, if None) of src[i] into dst[i]."""
        src = np.asarray(src, np.int64)
        lengths = np.full(src.shape, self.config.n_ctx) if lengths is None else lengths
        with self._serial:
            move_slots(self.k, self.v, self.slot_lengths, src, dst, lengths)

    # ------------------------------------------------------------ on the device

    def _layers(self, tokens, positions, slots, lengths):
        """The transformer over n rows, storing each row's K and V in its slot: -> x [n, C] on the device."""
        n, cfg, dw, gemm = len(tokens), self.config, self.device_weights, self.dispatch.gemm
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}, got {tokens.tolist()}")
        rows = cuda.to_device(np.stack([tokens, positions, slots, lengths]).astype(np.int32))  # [4, n]: one copy
        tokens, positions, slots, lengths = rows[0], rows[1], rows[2], rows[3]
        w, eps = self.work, cfg.layer_norm_epsilon
        x, h, qkv, a, y, f = w.x[:n], w.h[:n], w.qkv[:n], w.a[:n], w.y[:n], w.f[:n]
        ew.embed(tokens, positions, dw.wte, dw.wpe, x)  # [n, C]
        for i, block in enumerate(dw.blocks):
            ew.layer_norm(x, block.ln_1.g, block.ln_1.b, eps, h)  # [n, C]
            gemm(h, block.c_attn.w, block.c_attn.b, qkv)  # [n, C] -> [n, 3C]
            store_kv(qkv, self.k[i], self.v[i], slots, positions, self.slot_lengths)
            attention(qkv, self.k[i], self.v[i], slots, lengths, a)  # [n, 3C] -> [n, C]
            ew.residual_add(x, gemm(a, block.attn_proj.w, block.attn_proj.b, y))  # [n, C]
            ew.layer_norm(x, block.ln_2.g, block.ln_2.b, eps, h)  # [n, C]
            ew.gelu(gemm(h, block.c_fc.w, block.c_fc.b, f), f)  # [n, C] -> [n, 4C]
            ew.residual_add(x, gemm(f, block.mlp_proj.w, block.mlp_proj.b, y))  # [n, 4C] -> [n, C]
        return x

    def _logits(self, x) -> np.ndarray:
        """Final layer norm and LM head on the device, logits to the host: x [n, C] -> [n, V]."""
        n, dw = x.shape[0], self.device_weights
        h = ew.layer_norm(x, dw.ln_f.g, dw.ln_f.b, self.config.layer_norm_epsilon, self.work.h[:n])
        return self.dispatch.gemm(h, self.head.w, self.head.b, self.work.logits[:n]).copy_to_host()

    def _check_slots(self, slots: np.ndarray) -> None:
        if slots.min() < 0 or slots.max() >= self.n_slots:
            raise ValueError(f"slot out of range 0..{self.n_slots - 1}: {slots.tolist()}")

    # ------------------------------------------------------------ for tests and tools

    def kv_to_host(self) -> KVSlots:
        """A host copy of the KV slots (every position, used or not)."""
        cache = KVSlots.__new__(KVSlots)
        cache.k, cache.v = self.k.copy_to_host(), self.v.copy_to_host()
        return cache

    def cached_lengths(self) -> np.ndarray:
        """Positions cached per slot, the per-slot state the shuffle moves: [n_slots]."""
        return self.slot_lengths.copy_to_host()
