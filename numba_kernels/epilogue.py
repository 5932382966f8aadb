"""What a GEMM does with each finished output element: its epilogue, fused to save a launch.

A decode step of the first kernels launched 11 kernels a layer; three of
them only re-read what a GEMM had just written: the residual add after each
projection, the GELU after c_fc, the K/V store after c_attn. Each is an
epilogue here, a device function the staged GEMV (``gemm_staged.py``) calls
with ``value = acc + b[n]``, the element the separate kernels would have read:

- ``bias``: out[m, n] = value (every GEMM's plain store)
- ``residual``: out[m, n] += value; ``out`` is the residual stream x, so the
  projection adds itself in: x + (acc + b), the same two roundings as a GEMM
  into y and then ``residual_add(x, y)``
- ``gelu``: out[m, n] = gelu(value), the one ``elementwise.gelu_value``
- ``kv``: out[m, n] = value, and the K and V columns (n >= C) also into their
  slot: aux = (k_cache, v_cache, slots, positions, slot_lengths), as
  ``attention.store_kv_kernel`` writes them

So a fused launch gives bitwise what the separate launches give
(``tests/test_numba_fused.py``). ``separately`` runs the separate kernels, for
GEMM variants without epilogues.
"""

from __future__ import annotations

from numba import cuda

from numba_kernels import elementwise as ew
from numba_kernels.attention import store_kv

BIAS, RESIDUAL, GELU, KV = "bias", "residual", "gelu", "kv"


@cuda.jit(device=True)
def store_bias(out, aux, m, n, value):  # pragma: no cover - kernel
    out[m, n] = value


@cuda.jit(device=True)
def store_residual(out, aux, m, n, value):  # pragma: no cover - kernel
    out[m, n] = out[m, n] + value


@cuda.jit(device=True)
def store_gelu(out, aux, m, n, value):  # pragma: no cover - kernel
    out[m, n] = ew.gelu_value(value)


@cuda.jit(device=True)
def store_kv_cache(out, aux, m, n, value):  # pragma: no cover - kernel
    out[m, n] = value
    k_cache, v_cache, slots, positions, slot_lengths = aux
    d_head = k_cache.shape[3]
    c = k_cache.shape[1] * d_head
    if n >= c:
        s, t, i = slots[m], positions[m], (n - c) % c  # i = h * D + d
        if n < 2 * c:
            k_cache[s, i // d_head, t, i % d_head] = value
        else:
            v_cache[s, i // d_head, t, i % d_head] = value
        # the last row of a slot in this launch (prefill rows share one slot) records its length
        if n == c and (m + 1 == slots.shape[0] or slots[m + 1] != s):
            slot_lengths[s] = t + 1


STORES = {BIAS: store_bias, RESIDUAL: store_residual, GELU: store_gelu, KV: store_kv_cache}


def separately(epilogue: str, out, y, aux=()) -> None:
    """The separate kernels an epilogue replaces, after a GEMM wrote ``y`` (for ``residual``, ``out`` is x)."""
    if epilogue == RESIDUAL:
        ew.residual_add(out, y)
    elif epilogue == GELU:
        ew.gelu(y, out)
    elif epilogue == KV:
        store_kv(y, *aux)
    elif epilogue != BIAS:
        raise ValueError(f"unknown epilogue {epilogue!r}; choose {', '.join(STORES)}")
