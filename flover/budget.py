"""Memory is checked before it is allocated: weights, KV memory and instance copies against what the machine has."""

from __future__ import annotations

import os

from reference import GPTConfig

GIB = 2**30


def available_bytes() -> int:
    """Memory the machine can give now: MemAvailable from /proc/meminfo, else free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parameters(config: GPTConfig) -> int:
    c, m = config.n_embd, config.d_mlp
    per_block = 4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * m + m) + (m * c + c)  # 2 layer norms, 4 linears
    return config.vocab_size * c + config.n_ctx * c + config.n_layer * per_block + 2 * c


def weights_bytes(config: GPTConfig) -> int:
    """One backend's weights: the float32 weights and their copy packed for the invariant kernels."""
    return 2 * 4 * parameters(config)


def check_memory(config: GPTConfig, kv_bytes: int, instances: int = 0, instance_kv_bytes: int = 0,
                 available: int | None = None) -> None:  # fmt: skip
    """Raise ValueError naming the figures, the limit and the flag to change when a run would not fit.

    ``kv_bytes``: the KV memory of the run's shared backend; ``instances``
    more processes each hold their own weights and ``instance_kv_bytes``.
    """
    available = available_bytes() if available is None else available
    weights = weights_bytes(config)
    copies = instances * (weights + instance_kv_bytes)
    total = weights + kv_bytes + copies
    if total <= available:
        return
    flag = "--instances" if copies > kv_bytes else "--slots or --kv-memory"
    raise ValueError(f"this run needs {total / GIB:.1f} GiB (weights {weights / GIB:.1f} GiB, KV memory "
                     f"{kv_bytes / GIB:.1f} GiB, {instances} instance copies {copies / GIB:.1f} GiB), more than the "
                     f"{available / GIB:.1f} GiB this machine has available; lower {flag}")  # fmt: skip
