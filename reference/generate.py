"""Serial generation: one request at a time, tokens streamed as they are made.

This is the ground truth every scheduling policy is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from reference.backend import Backend
from reference.checkpoint import load_checkpoint
from reference.config import PRESETS, GPTConfig, preset
from reference.sampling import Sampler, SamplingParams
from reference.weights import GPT2Weights, init_weights


def check_request(config: GPTConfig, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    """Raise ValueError naming the value and the limit for a request the model cannot run."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty; it needs at least 1 token")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    bad = [int(t) for t in prompt_ids if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary 0..{config.vocab_size - 1}")
    if len(prompt_ids) + max_new_tokens > config.n_ctx:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} = "
            f"{len(prompt_ids) + max_new_tokens} exceeds the context n_ctx {config.n_ctx}"
        )


def generate(
    backend: Backend,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Sequence[int] = (),
    slot: int = 0,
) -> Iterator[int]:
    """Yield new token ids until ``max_new_tokens`` or a stop id (which is yielded too)."""
    check_request(backend.config, prompt_ids, max_new_tokens)
    sample = Sampler(sampling)
    stops = set(stop_ids)
    prompt = np.asarray(prompt_ids, np.int64)
    token = sample(backend.prefill(slot, prompt))
    position = len(prompt)
    for made in range(1, max_new_tokens + 1):
        yield token
        if token in stops or made == max_new_tokens:
            return
        logits = backend.decode(np.array([slot]), np.array([token]), np.array([position]))
        token = sample(logits[0])
        position += 1


def load_model(model: str | Path, weights_seed: int = 0) -> tuple[GPTConfig, GPT2Weights]:
    """A preset name (random weights from ``weights_seed``) or a checkpoint directory."""
    if str(model) in PRESETS:
        config = preset(str(model))
        return config, init_weights(config, seed=weights_seed)
    if Path(model).exists():
        return load_checkpoint(model)
    raise ValueError(f"model {str(model)!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
