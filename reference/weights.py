"""GPT-2 weights as plain records of NumPy arrays, and their seeded initialisation.

Linear weights are stored as (in, out), the orientation of the Hugging Face
``Conv1D`` layer, so every projection is ``x @ w + b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.config import GPTConfig


@dataclass(slots=True)
class Linear:
    w: np.ndarray  # [n_in, n_out]
    b: np.ndarray  # [n_out]


@dataclass(slots=True)
class LayerNorm:
    g: np.ndarray  # [n_embd]
    b: np.ndarray  # [n_embd]


@dataclass(slots=True)
class Block:
    ln_1: LayerNorm
    c_attn: Linear  # [n_embd, 3*n_embd]: q, k and v side by side
    attn_proj: Linear  # [n_embd, n_embd]
    ln_2: LayerNorm
    c_fc: Linear  # [n_embd, d_mlp]
    mlp_proj: Linear  # [d_mlp, n_embd]


@dataclass(slots=True)
class GPT2Weights:
    wte: np.ndarray  # [vocab_size, n_embd], also the LM head (tied)
    wpe: np.ndarray  # [n_ctx, n_embd]
    blocks: list[Block]
    ln_f: LayerNorm
    lm_head: np.ndarray | None = None  # [vocab_size, n_embd] when not tied to wte

    @property
    def head(self) -> np.ndarray:
        return self.wte if self.lm_head is None else self.lm_head


def init_weights(config: GPTConfig, seed: int = 0, std: float = 0.02) -> GPT2Weights:
    """GPT-2's initialisation: N(0, std) weights, zero biases, unit gains.

    The residual projections are scaled by 1/sqrt(2 * n_layer) as in the paper.
    """
    rng = np.random.default_rng(seed)
    c, m = config.n_embd, config.d_mlp
    proj_std = std / np.sqrt(2 * config.n_layer)

    def normal(shape: tuple[int, ...], scale: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)

    def linear(n_in: int, n_out: int, scale: float) -> Linear:
        return Linear(normal((n_in, n_out), scale), np.zeros(n_out, np.float32))

    def norm() -> LayerNorm:
        return LayerNorm(np.ones(c, np.float32), np.zeros(c, np.float32))

    blocks = [
        Block(
            ln_1=norm(),
            c_attn=linear(c, 3 * c, std),
            attn_proj=linear(c, c, proj_std),
            ln_2=norm(),
            c_fc=linear(c, m, std),
            mlp_proj=linear(m, c, proj_std),
        )
        for _ in range(config.n_layer)
    ]
    return GPT2Weights(
        wte=normal((config.vocab_size, c), std),
        wpe=normal((config.n_ctx, c), std / 2),
        blocks=blocks,
        ln_f=norm(),
    )
