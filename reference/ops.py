"""The math of GPT-2 as plain NumPy functions, in the style of picoGPT.

These run the prefill of one request (a whole prompt at once) and the
teaching-path forward. The batched decode step uses the batch-invariant
kernels of ``reference.invariant`` instead; see that module for why.
"""

from __future__ import annotations

import numpy as np


def gelu(x: np.ndarray) -> np.ndarray:
    # GPT-2's tanh approximation ("gelu_new")
    return 0.5 * x * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = np.mean(x, axis=-1, keepdims=True)  # [n, 1]
    var = np.var(x, axis=-1, keepdims=True)  # [n, 1]
    return g * (x - mean) / np.sqrt(var + np.float32(eps)) + b  # [n, n_embd]


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x @ w + b  # [n, n_in] @ [n_in, n_out] -> [n, n_out]


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Attention of every position over itself and the positions before it.

    q: [n_head, n_q, head_dim]; k, v: [n_head, n_kv, head_dim], where the
    queries are the last n_q of the n_kv positions.
    """
    n_q, n_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(head_dim))  # [n_head, n_q, n_kv]
    future = np.triu(np.ones((n_q, n_kv), dtype=bool), k=n_kv - n_q + 1)  # [n_q, n_kv]
    scores = np.where(future, np.float32(-np.inf), scores)
    return softmax(scores) @ v  # [n_head, n_q, n_kv] @ [n_head, n_kv, head_dim] -> [n_head, n_q, head_dim]


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    n, c = x.shape
    return x.reshape(n, n_head, c // n_head).transpose(1, 0, 2)  # [n, c] -> [n_head, n, head_dim]


def merge_heads(x: np.ndarray) -> np.ndarray:
    n_head, n, head_dim = x.shape
    return x.transpose(1, 0, 2).reshape(n, n_head * head_dim)  # [n_head, n, head_dim] -> [n, c]
