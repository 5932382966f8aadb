"""GPT-2 hyperparameters and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_ctx: int
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None  # MLP width; GPT-2 uses 4 * n_embd

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def with_(self, **changes) -> GPTConfig:
        return replace(self, **changes)


PRESETS: dict[str, GPTConfig] = {
    # A byte vocabulary and 4 heads (divisible by 1, 2 and 4 tensor-parallel ranks).
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_ctx=256),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_ctx=1024),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, n_ctx=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, n_ctx=1024),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, n_ctx=1024),
}


def preset(name: str) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
