"""Launch-shape helpers shared by the kernels' host functions."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Blocks of b that cover a."""
    return (a + b - 1) // b


def block_threads(n: int, cap: int) -> int:
    """A block size for n items: the power of two >= n, from 32 (a warp) up to ``cap``.

    It depends on a model size only (a width, head_dim, n_ctx), never on a batch.
    """
    threads = 32
    while threads < n and threads < cap:
        threads *= 2
    return threads
