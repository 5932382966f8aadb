"""Model shapes for planning: the GPT-2 presets, GPT-J 6B and Llama-like 13B/33B/65B.

A shape is what the cost model needs (layers, width, heads, MLP, vocabulary,
context, whether the head shares the embedding) and nothing more: the
simulator allocates no weights. ``config`` is the ``GPTConfig`` the engine
sees (its vocabulary and context bound the requests).

What the Llama-like shapes approximate: their attention and MLP matrices
are exact (SwiGLU's three MLP matrices of d_mlp, no biases, untied head), but
RMSNorm, rotary embeddings and the SiLU gate are priced as GPT-2's layer
norms, learned positions and GELU: elementwise work a decode step hardly
notices. GPT-J runs attention and MLP side by side from one layer norm and
rotates 64 of each head's dimensions; neither changes a step's bytes or FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from reference.config import PRESETS, GPTConfig

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    config: GPTConfig
    gated_mlp: bool = False  # SwiGLU: three C x d_mlp matrices instead of two
    tied_head: bool = True  # the LM head reads the embedding matrix (GPT-2), else a matrix of its own
    learned_positions: bool = True  # GPT-2's position embeddings; rotary ones (GPT-J, Llama) have no weights

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    def layer_parameters(self) -> int:
        """One transformer block: 4 C x C attention matrices, the MLP, their biases and two norms."""
        c, m = self.config.n_embd, self.config.d_mlp
        biases = 0 if self.gated_mlp else 3 * c + c + m + c
        return 4 * c * c + self.mlp_matrices * c * m + biases + 4 * c

    def parameters(self) -> int:
        c = self.config
        embeddings = c.vocab_size * c.n_embd * (1 if self.tied_head else 2)
        positions = c.n_ctx * c.n_embd if self.learned_positions else 0
        return c.n_layer * self.layer_parameters() + embeddings + positions + 2 * c.n_embd

    def weights_bytes(self, dtype: str) -> int:
        return self.parameters() * DTYPE_BYTES[dtype]

    def kv_bytes_per_position(self, dtype: str) -> int:
        """K and V of every layer for one token."""
        return 2 * self.config.n_layer * self.config.n_embd * DTYPE_BYTES[dtype]


def _llama(name: str, n_layer: int, n_embd: int, n_head: int, d_mlp: int) -> ModelShape:
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=32000, n_ctx=2048, n_inner=d_mlp)
    return ModelShape(name, config, gated_mlp=True, tied_head=False, learned_positions=False)


SHAPES: dict[str, ModelShape] = {
    **{name: ModelShape(name, config) for name, config in PRESETS.items()},
    # GPT-J 6B (EleutherAI): 28 layers, 4096 wide, 16 heads of 256, MLP 16384, vocabulary 50400, context 2048
    "gptj-6b": ModelShape("gptj-6b", GPTConfig(n_layer=28, n_head=16, n_embd=4096, vocab_size=50400, n_ctx=2048,
                                               n_inner=16384), tied_head=False, learned_positions=False),  # fmt: skip
    # LLaMA 13B, 33B, 65B (Touvron et al. 2023, table 2; MLP widths from the released configs)
    "llama-13b": _llama("llama-13b", 40, 5120, 40, 13824),
    "llama-33b": _llama("llama-33b", 60, 6656, 52, 17920),
    "llama-65b": _llama("llama-65b", 80, 8192, 64, 22016),
}


def model_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]
