# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 1: GPT-2 in NumPy, one forward pass shape by shape
#
# A language model reads a sequence of token ids and returns, for every
# position, a score (a *logit*) for every possible next token. GPT-2 does it
# with a few operations repeated layer after layer: an embedding, layer
# norm, causal self-attention, an MLP, and a final projection onto the
# vocabulary (the *LM head*).
#
# flover's ground truth is `reference/`, GPT-2 written in plain NumPy. This
# lesson rebuilds its forward pass one operation at a time from the functions
# of `reference.ops`, prints the shape after each step, and ends by checking
# that our version equals `reference.forward` bit for bit.
#
# Run this file with `python tutorials/01_gpt2_in_numpy.py`, or open it as a
# notebook (see `tutorials/README.md`). Pictures are written to the folder
# named by the environment variable `FLOVER_TUTORIAL_OUT` (default
# `out/tutorials/`) and drawn inline in Jupyter.

# %% [markdown]
# Helpers used in every lesson, from `tutorials/_display.py`: `OUT` is the folder for pictures, and
# `show(fig, name)` saves a Matplotlib figure there (and draws it when we run
# inside Jupyter). `show_file(path)` does the same for a picture already on disk.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)

import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py

# %% [markdown]
# ## The model: a config and a bag of arrays
#
# `flover.loading.resolve(None)` loads flover's default model and returns three
# things:
#
# - a `GPTConfig`, the hyperparameters: `n_layer` blocks, `n_head` attention
#   heads, `n_embd` numbers per token (we write **C**), `vocab_size` possible
#   tokens (**V**), and `n_ctx`, the longest sequence the model accepts.
#   `head_dim = n_embd // n_head` (**D**) and `d_mlp = 4 * n_embd` follow.
# - a `GPT2Weights`, a plain record of NumPy arrays (listed below);
# - a tokenizer, which turns text into token ids (`encode`) and back (`decode`).
#
# The default model is `tiny-py`, a small GPT-2 trained on the Python standard
# library with one token per byte (so V = 256), shipped in `flover/models/`.
# Where it is missing, `resolve(None)` falls back to the `tiny` preset with
# random weights: every step of this lesson still holds, only the generated
# text is noise. `flover.loading.default_model()` tells which one you have.
# %%
from flover.loading import default_model, resolve

config, weights, tokenizer = resolve(None)
print("model:", default_model())
print(config)
C, H, D, V = config.n_embd, config.n_head, config.head_dim, config.vocab_size
assert H * D == C

# %% [markdown]
# Every weight is a NumPy array of float32. `wte` embeds tokens, `wpe` embeds
# positions, each of the `n_layer` entries of `blocks` is one transformer
# block with two layer norms (`ln_1`, `ln_2`, each a gain `g` and a bias `b`)
# and four linear layers (each a matrix `w` of shape [n_in, n_out] and a bias
# `b`), and `ln_f` is the final layer norm. GPT-2 reuses `wte` as its LM head
# (the weights are *tied*); `weights.head` is that matrix.


# %%
def shapes_of(w) -> dict[str, tuple[int, ...]]:
    table = {"wte": w.wte.shape, "wpe": w.wpe.shape}
    for name in ("ln_1", "c_attn", "attn_proj", "ln_2", "c_fc", "mlp_proj"):
        part = getattr(w.blocks[0], name)
        for field in ("g", "w", "b"):
            if hasattr(part, field):
                table[f"blocks[i].{name}.{field}"] = getattr(part, field).shape
    table["ln_f.g"], table["ln_f.b"] = w.ln_f.g.shape, w.ln_f.b.shape
    return table


for name, shape in shapes_of(weights).items():
    print(f"{name:24s} {shape}")
per_block = sum(int(np.prod(s)) for n, s in shapes_of(weights).items() if n.startswith("blocks"))
n_params = weights.wte.size + weights.wpe.size + 2 * C + config.n_layer * per_block
print(f"{n_params:,} parameters, {4 * n_params / 1e6:.1f} MB as float32")

assert weights.wte.shape == (V, C) and weights.wpe.shape == (config.n_ctx, C)
assert weights.blocks[0].c_attn.w.shape == (C, 3 * C)
assert weights.blocks[0].c_fc.w.shape == (C, config.d_mlp)
assert np.array_equal(weights.head, weights.wte)  # the LM head is tied to the token embedding


# %% [markdown]
# ## Tokens
#
# The tokenizer turns text into a 1-D array of **T** token ids. With a byte
# vocabulary each id is simply one UTF-8 byte.

# %%
text = "class Point:\n    def __init__(self"
tokens = np.array(tokenizer.encode(text))  # [T]
T = len(tokens)
print(T, "tokens:", tokens.tolist())
assert tokenizer.decode(tokens.tolist()) == text
assert tokens.shape == (T,) and tokens.max() < V

# %% [markdown]
# ## Step 1: embedding
#
# Each token id picks its row of `wte` (what the token is), and each position
# picks its row of `wpe` (where it stands). Their sum is the *residual
# stream* `x`, one vector of C numbers per token, which every block reads and
# adds to.

# %%
x = weights.wte[tokens] + weights.wpe[np.arange(T)]  # [T] -> [T, C]
print("x", x.shape, x.dtype)
assert x.shape == (T, C) and x.dtype == np.float32

# %% [markdown]
# ## Step 2: layer norm
#
# `ops.layer_norm(x, g, b, eps)` rescales every row of `x` to mean 0 and
# variance 1, then multiplies by a learned gain `g` and adds a learned bias
# `b` (both [C]). `eps` (`config.layer_norm_epsilon`) keeps the division safe.
# With a gain of ones and a bias of zeros we can see the normalisation itself.

# %%
from reference import ops

eps = config.layer_norm_epsilon
plain = ops.layer_norm(x, np.ones(C, np.float32), np.zeros(C, np.float32), eps)  # [T, C]
print("row means", plain.mean(axis=-1)[:4], "row variances", plain.var(axis=-1)[:4])
assert np.allclose(plain.mean(axis=-1), 0, atol=1e-5)
# eps pulls the variance a little below 1: var / (var + eps), which shows when x is small
assert np.allclose(plain.var(axis=-1), x.var(axis=-1) / (x.var(axis=-1) + eps), rtol=1e-3)

block = weights.blocks[0]
h = ops.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [T, C], the input of the first attention
assert h.shape == (T, C)

# %% [markdown]
# ## Step 3: causal self-attention
#
# Attention lets each token gather information from the tokens before it.
#
# 1. One linear layer, `ops.linear(h, w, b) = h @ w + b`, makes a *query*, a
#    *key* and a *value* per token, side by side: [T, C] -> [T, 3C].
# 2. `np.split` cuts that into `q`, `k`, `v`, each [T, C].
# 3. `ops.split_heads` cuts each vector into H heads of D numbers and puts the
#    head first: [T, C] -> [H, T, D]. Each head attends on its own. Head 1 is
#    just columns D..2D of every row.

# %%
qkv = ops.linear(h, block.c_attn.w, block.c_attn.b)  # [T, C] @ [C, 3C] + [3C] -> [T, 3C]
q, k, v = np.split(qkv, 3, axis=-1)  # 3 x [T, C]
print("qkv", qkv.shape, "q", q.shape)
qh, kh, vh = ops.split_heads(q, H), ops.split_heads(k, H), ops.split_heads(v, H)  # 3 x [H, T, D]
print("q split into heads", qh.shape)
assert qh.shape == (H, T, D)
assert np.array_equal(qh[1], q[:, D : 2 * D])

# %% [markdown]
# 4. Scores: every query against every key, `q @ k^T`, scaled by 1/sqrt(D)
#    so their spread does not grow with D: [H, T, D] @ [H, D, T] -> [H, T, T].
#    Entry (h, i, j) says how much token i looks at token j in head h.
# 5. The *causal mask*: token i may only look at tokens j <= i (it must not
#    read the future it is trying to predict), so every score above the
#    diagonal becomes minus infinity.
# 6. `ops.softmax` turns each row of scores into weights that are positive
#    and sum to 1; a score of minus infinity gets weight exactly 0.
# 7. Each token's output is the weighted sum of the values:
#    [H, T, T] @ [H, T, D] -> [H, T, D].
#
# `ops.causal_attention(q, k, v)` does steps 4 to 7; we do them by hand and
# compare.

# %%
scores = qh @ kh.transpose(0, 2, 1) / np.float32(np.sqrt(D))  # [H, T, D] @ [H, D, T] -> [H, T, T]
future = np.triu(np.ones((T, T), dtype=bool), k=1)  # [T, T], True above the diagonal
scores = np.where(future, np.float32(-np.inf), scores)
attn = ops.softmax(scores)  # [H, T, T]
a = attn @ vh  # [H, T, T] @ [H, T, D] -> [H, T, D]
print("scores", scores.shape, "attention output", a.shape)
assert np.allclose(attn.sum(axis=-1), 1, atol=1e-6)
assert np.all(attn[:, future] == 0), "no token attends to a later one"
assert np.array_equal(a, ops.causal_attention(qh, kh, vh))

# %% [markdown]
# The attention weights of the first block, one panel per head. Row i is
# token i; the upper triangle is blank because of the mask. (With random
# weights every head spreads its attention evenly over the past; a trained
# model's heads pick out particular tokens.)

# %%
labels = [{" ": "sp", "\n": "\\n"}.get(tokenizer.decode([int(t)]), tokenizer.decode([int(t)])) for t in tokens]
fig, axes = plt.subplots(1, H, figsize=(3.2 * H, 3.4))
for head, ax in enumerate(np.atleast_1d(axes)):
    ax.imshow(np.ma.masked_where(future, attn[head]), cmap="viridis")  # masked cells stay white
    ax.set_title(f"head {head}")
    ax.set_xticks(range(T), labels, fontsize=5, rotation=90)
    ax.set_yticks(range(T), labels, fontsize=5)
fig.suptitle("block 0 attention weights: row = query token, column = key token")
show(fig, "01_attention.png")

# %% [markdown]
# 8. `ops.merge_heads` undoes the split, [H, T, D] -> [T, C], and a second
#    linear layer (`attn_proj`) mixes the heads: [T, C] -> [T, C].
# 9. The result is *added* to the residual stream `x`.

# %%
merged = ops.merge_heads(a)  # [H, T, D] -> [T, C]
assert np.array_equal(ops.split_heads(merged, H), a)
x_after_attn = x + ops.linear(merged, block.attn_proj.w, block.attn_proj.b)  # [T, C]
assert x_after_attn.shape == (T, C)

# %% [markdown]
# ## Step 4: the MLP with GELU
#
# The second half of a block works on each token alone: layer norm (`ln_2`),
# a linear layer that widens C to `d_mlp` = 4C (`c_fc`), the GELU
# nonlinearity, and a linear layer back to C (`mlp_proj`), added to the
# residual stream. `ops.gelu` is GPT-2's tanh approximation of
# x * Phi(x): close to ReLU for large |x| but smooth, and slightly negative
# just below zero.

# %%
h2 = ops.layer_norm(x_after_attn, block.ln_2.g, block.ln_2.b, eps)  # [T, C]
wide = ops.gelu(ops.linear(h2, block.c_fc.w, block.c_fc.b))  # [T, C] @ [C, 4C] -> [T, 4C]
x_after_block = x_after_attn + ops.linear(wide, block.mlp_proj.w, block.mlp_proj.b)  # [T, 4C] @ [4C, C] -> [T, C]
print("MLP hidden", wide.shape, "block output", x_after_block.shape)
assert wide.shape == (T, config.d_mlp) and x_after_block.shape == (T, C)

grid = np.linspace(-4, 4, 401, dtype=np.float32)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(grid, np.maximum(grid, 0), "--", color="grey", label="ReLU")
ax.plot(grid, ops.gelu(grid), label="GELU (tanh approximation)")
ax.axhline(0, color="black", linewidth=0.5)
ax.legend()
ax.set_title("ops.gelu")
show(fig, "01_gelu.png")
assert ops.gelu(np.float32(-1.0)) < 0 and abs(ops.gelu(np.float32(3.0)) - 3.0) < 0.01

# %% [markdown]
# ## Step 5: all blocks, the final layer norm and the LM head
#
# A block is steps 2 to 4. GPT-2 runs its `n_layer` blocks one after another,
# applies the final layer norm `ln_f`, and projects every position onto the
# vocabulary with the LM head: [T, C] @ [C, V] -> [T, V]. Here is the whole
# forward pass from the pieces above.


# %%
def my_block(x: np.ndarray, block) -> np.ndarray:
    h = ops.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [T, C]
    q, k, v = np.split(ops.linear(h, block.c_attn.w, block.c_attn.b), 3, axis=-1)  # 3 x [T, C]
    a = ops.causal_attention(ops.split_heads(q, H), ops.split_heads(k, H), ops.split_heads(v, H))  # [H, T, D]
    x = x + ops.linear(ops.merge_heads(a), block.attn_proj.w, block.attn_proj.b)  # [T, C]
    h = ops.gelu(ops.linear(ops.layer_norm(x, block.ln_2.g, block.ln_2.b, eps), block.c_fc.w, block.c_fc.b))  # [T, 4C]
    return x + ops.linear(h, block.mlp_proj.w, block.mlp_proj.b)  # [T, C]


def my_forward(tokens: np.ndarray) -> np.ndarray:
    x = weights.wte[tokens] + weights.wpe[np.arange(len(tokens))]  # [T, C]
    for block in weights.blocks:
        x = my_block(x, block)  # [T, C]
    x = ops.layer_norm(x, weights.ln_f.g, weights.ln_f.b, eps)  # [T, C]
    return x @ weights.head.T  # [T, C] @ [C, V] -> [T, V]


assert np.array_equal(my_block(x, weights.blocks[0]), x_after_block)
logits = my_forward(tokens)
print("logits", logits.shape)
assert logits.shape == (T, V)

# %% [markdown]
# ## The check: our forward pass is `reference.forward`, bit for bit
#
# `reference.forward(weights, config, tokens)` is the project's own version.
# We used the same operations in the same order, so the float32 results are
# not just close but identical. (`tests/test_hf_parity.py` checks the
# reference in turn against Hugging Face `transformers`.)

# %%
from reference import forward

expected = forward(weights, config, tokens)  # [T] -> [T, V]
assert np.array_equal(logits, expected)
print("my_forward == reference.forward, bitwise:", np.array_equal(logits, expected))

# %% [markdown]
# ## Reading the logits
#
# Row t of the logits scores the token that follows position t. The mask
# makes row t depend on tokens 0..t only: change the last token and every
# earlier row stays the same (up to the last bits of rounding: NumPy's `@`
# hands matrix products to BLAS, the Basic Linear Algebra Subprograms, a
# library of tuned routines that may add up a product's terms in another
# order for another shape, and floating-point sums in another order round
# differently; lesson 8 goes into it). That is what lets a model train on
# every position at once, and it is what lesson 2 exploits to generate
# without recomputing the past.

# %%
changed = tokens.copy()
changed[-1] = (changed[-1] + 1) % V
assert np.allclose(forward(weights, config, changed)[:-1], expected[:-1], rtol=0, atol=1e-5)
assert not np.allclose(forward(weights, config, changed)[-1], expected[-1])

probs = ops.softmax(logits[-1].astype(np.float64))  # [V], the next token after the whole text
top = np.argsort(-probs)[:8]
for t in top:
    print(f"{tokenizer.decode([int(t)])!r:10} {probs[t]:.3f}")
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar([repr(tokenizer.decode([int(t)])) for t in top], probs[top])
ax.set_title(f"next token after {text[-12:]!r}")
ax.set_ylabel("probability")
show(fig, "01_next_token.png")
assert np.isclose(probs.sum(), 1) and np.argmax(logits[-1]) == top[0]

# %% [markdown]
# ## What we built
#
# | step | operation | shape |
# |---|---|---|
# | embedding | `wte[tokens] + wpe[positions]` | [T] -> [T, C] |
# | layer norm | `ops.layer_norm` | [T, C] -> [T, C] |
# | q, k, v | `ops.linear` with `c_attn`, `np.split` | [T, C] -> 3 x [T, C] |
# | heads | `ops.split_heads` | [T, C] -> [H, T, D] |
# | attention | `ops.causal_attention` | 3 x [H, T, D] -> [H, T, D] |
# | merge, project, add | `ops.merge_heads`, `attn_proj` | [H, T, D] -> [T, C] |
# | MLP | `c_fc`, `ops.gelu`, `mlp_proj` | [T, C] -> [T, 4C] -> [T, C] |
# | LM head | `ln_f`, `@ wte.T` | [T, C] -> [T, V] |
#
# Next, lesson 2 generates text one token at a time and keeps the keys and
# values of the past in a cache.
