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
# # Lesson 10: tensor parallelism over MPI
#
# A model too big for one device, or too slow on one, can be split across
# several. **Tensor parallelism** (Megatron-LM's scheme) splits every large
# weight matrix so that each of N processes holds 1/N of every layer, and
# all N work on every step together. Temporal fusion does not change: the
# engine still runs one fused decode step over the requests in flight; each
# step now runs on N processes at once.
#
# This lesson splits GPT-2 for N = 2 in a single process first, and checks
# by hand that the parts add up to the whole layer. Then it writes the one
# exchange the split needs, a sum over the processes in a fixed order, as a
# small MPI program of our own, checks it bit for bit against flover's, and
# sees why MPI's own sum is not used. Last it runs the split model for real,
# as two processes, and checks that it generates the tokens of one process.

# %% [markdown]
# The helpers of lesson 1 (`OUT`, `show`, `show_file`), and one thread per
# process, as in lesson 2: below, several processes share this machine's
# cores.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # before Numba loads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads

# %% [markdown]
# ## MPI in one paragraph
#
# **MPI** (the Message Passing Interface) is how processes that share no
# memory, on one machine or many, work on one job. `mpiexec -n N program`
# starts N copies of the same program; each copy is a **rank**, numbered 0
# to N - 1, and together they form the **world**. Each rank learns its own
# number and the world's size, and they exchange arrays by messages. The
# operations we need are **collectives**, which every rank calls together: a
# *broadcast* sends rank 0's array to every rank, a *gather* collects every
# rank's array on rank 0, an *allgather* gives every rank everyone's arrays,
# and an *all-reduce* gives every rank the sum of everyone's arrays.
# `mpi4py` is Python's MPI (installed with `pip install 'flover[mpi]'`,
# which brings MPICH, an MPI library, and its `mpiexec` too). Its methods
# come in two kinds: capitalised ones (`Bcast`, `Allgather`, `Allreduce`)
# send NumPy arrays as raw memory buffers, lowercase ones (`bcast`,
# `allgather`) pickle any Python object. flover's tensor parallelism lives
# in `mpi_tp/` and uses only the buffer kind on its step path.
#
# Every cell below needs `mpi_tp`, which imports mpi4py. Without mpi4py or
# `mpiexec` this lesson says what to install and stops here.

# %%
import shutil
import sys
from pathlib import Path

try:
    from mpi4py import MPI
except ImportError:
    MPI = None
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
if MPI is None or MPIEXEC is None:
    print(f"This lesson needs {'mpi4py' if MPI is None else 'mpiexec'}: pip install 'flover[mpi]' installs "
          "mpi4py and MPICH's mpiexec. Skipping the rest of the lesson.")  # fmt: skip
    raise SystemExit(0)
print("MPI library:", MPI.Get_library_version().splitlines()[0])
print("mpiexec:", MPIEXEC)

# %% [markdown]
# ## Two ways to split a linear layer
#
# Take y = x @ W, with W of shape [K, N_out], and N ranks.
#
# - Split W by **columns**: rank r keeps W[:, cols_r] and computes
#   y[:, cols_r] = x @ W[:, cols_r], a slice of the output. It needs the
#   whole x, and no communication. Megatron calls this a
#   **ColumnParallelLinear**.
# - Split W by **rows**: rank r keeps W[rows_r, :] and, given the matching
#   columns of x, computes x[:, rows_r] @ W[rows_r, :]. That is a full-size
#   y, but only part of the sum over K: the true y is the sum of all N
#   partial products, one all-reduce. A **RowParallelLinear**. Its bias is
#   added once, after the sum.
#
# A transformer block pairs them so that the output slices of a column split
# are exactly the inputs of a row split, and nothing is exchanged in
# between:
#
# - attention: `c_attn` is column-parallel **by heads**. With
#   Hp = n_head / N **heads per partition**, rank r keeps the q, k and v
#   columns of heads r*Hp .. (r+1)*Hp - 1. Heads attend independently
#   (lesson 1), so the rank runs attention on its own heads alone, and keeps
#   only those heads' keys and values in its KV slots. Then `attn_proj` is
#   row-parallel over the same head columns: one all-reduce.
# - MLP: `c_fc` is column-parallel (rank r keeps d_mlp / N of the hidden
#   units; GELU works element by element), `mlp_proj` row-parallel: one
#   all-reduce.
#
# Two all-reduces per block, then. Layer norms and position embeddings are
# small and every rank keeps a copy.
#
# `mpi_tp.shard_weights(config, weights, rank, world)` cuts rank `rank`'s
# share out of the full weights, as fresh arrays, so that a rank can drop
# the full model afterwards. It is short enough to read whole:

# %%
import inspect

from mpi_tp import ColumnParallelLinear, RowParallelLinear, ShardWeights, shard_weights

print(inspect.getsource(shard_weights))

# %% [markdown]
# What it returns is a `ShardWeights`. Its `blocks` hold, for each
# transformer block, the two layer norms, a `ColumnParallelLinear` (`w`,
# `b`) for `c_attn` and `c_fc`, and a `RowParallelLinear` (`w`, `b`, and
# `zero`, a bias of zeros for the partial product) for `attn_proj` and
# `mlp_proj`. Here is each of its fields for both shards of the default
# model of lesson 1 with N = 2, then each linear layer of block 0.

# %%
from dataclasses import fields

import numpy as np

from flover.loading import resolve

config, weights, tokenizer = resolve(None)
WORLD = 2
C, H, D, V = config.n_embd, config.n_head, config.head_dim, config.vocab_size
Hp, M = H // WORLD, config.d_mlp // WORLD
shards = [shard_weights(config, weights, rank, WORLD) for rank in range(WORLD)]


def describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array {list(value.shape)}"
    if isinstance(value, list):
        return f"{len(value)} x {type(value[0]).__name__}"
    return type(value).__name__ if hasattr(value, "__slots__") else repr(value)


print(f"{'ShardWeights':14s} {'rank 0':26s} rank 1")
for f in fields(ShardWeights):
    print(f"{f.name:14s} {describe(getattr(shards[0], f.name)):26s} {describe(getattr(shards[1], f.name))}")
block0 = shards[0].blocks[0]
print()
for name in ("c_attn", "attn_proj", "c_fc", "mlp_proj"):
    part = getattr(block0, name)
    print(f"{name:9s} {type(part).__name__:20s} full {getattr(weights.blocks[0], name).w.shape} -> rank 0 {part.w.shape}")
assert all(s.n_head == Hp for s in shards)
assert isinstance(block0.c_attn, ColumnParallelLinear) and isinstance(block0.mlp_proj, RowParallelLinear)
assert block0.c_attn.w.shape == (C, 3 * Hp * D) and block0.attn_proj.w.shape == (Hp * D, C)
assert block0.c_fc.w.shape == (C, M) and block0.mlp_proj.w.shape == (M, C)

# %% [markdown]
# Which columns of `c_attn` went where? We find each of the full matrix's 3C
# columns among the ranks' columns: rank r got heads r*Hp .. (r+1)*Hp - 1 of
# q, of k and of v, so the picture shows each rank three times.

# %%
import matplotlib.pyplot as plt
from _display import OUT, show  # tutorials/_display.py

full = weights.blocks[0].c_attn.w  # [C, 3C]: q | k | v, heads inside each
where = {s.blocks[0].c_attn.w[:, j].tobytes(): s.rank for s in shards for j in range(3 * Hp * D)}
owner = np.array([where[full[:, j].tobytes()] for j in range(3 * C)])  # [3C]
head_of_column = (np.arange(3 * C) % C) // D  # [3C]
assert np.array_equal(owner, head_of_column // Hp), "rank r owns exactly the columns of its heads, in q, k and v"

fig, ax = plt.subplots(figsize=(9, 1.4))
ax.imshow(owner[None], cmap="Paired", aspect="auto", interpolation="nearest", vmin=0, vmax=11)
for j, label in enumerate("qkv"):
    for rank in range(WORLD):
        ax.text(j * C + (rank + 0.5) * C / WORLD, 0, f"{label}, rank {rank}", ha="center", va="center",
                color="black" if rank == 0 else "white")  # fmt: skip
for column in range(D, 3 * C, D):
    ax.axvline(column - 0.5, color="white", linewidth=0.8)  # head boundaries
ax.set(yticks=[], xlabel="output column of c_attn (3C); thin lines between heads",
       title=f"c_attn split by heads: {Hp} of {H} heads per rank")  # fmt: skip
show(fig, "10_c_attn_split.png")

# %% [markdown]
# ## One block by hand: the parts add up
#
# Now run block 0 on a prompt twice: whole, as in lesson 1, and as two ranks
# would, each on its own shard, the two partial products added where an
# all-reduce would add them. `ops` is lesson 1's `reference.ops`.

# %%
from reference import ops

eps = config.layer_norm_epsilon
tokens = np.array(tokenizer.encode("def add(a, b):\n    return"))  # [T]
T = len(tokens)
x = weights.wte[tokens] + weights.wpe[np.arange(T)]  # [T, C]


def whole_block(x: np.ndarray, block) -> tuple[np.ndarray, np.ndarray]:
    """Lesson 1's block on the full weights; -> (x after attention, x after the MLP), each [T, C]."""
    h = ops.layer_norm(x, block.ln_1.g, block.ln_1.b, eps)  # [T, C]
    q, k, v = (ops.split_heads(t, H) for t in np.split(ops.linear(h, block.c_attn.w, block.c_attn.b), 3, axis=-1))
    x = x + ops.linear(ops.merge_heads(ops.causal_attention(q, k, v)), block.attn_proj.w, block.attn_proj.b)
    h = ops.gelu(ops.linear(ops.layer_norm(x, block.ln_2.g, block.ln_2.b, eps), block.c_fc.w, block.c_fc.b))
    return x, x + ops.linear(h, block.mlp_proj.w, block.mlp_proj.b)  # [T, C], [T, C]


def attention_partial(x: np.ndarray, part) -> np.ndarray:
    """One rank's attention: its heads only, then its rows of attn_proj; -> a partial sum [T, C]."""
    h = ops.layer_norm(x, part.ln_1.g, part.ln_1.b, eps)  # [T, C], the same on every rank
    qkv = ops.linear(h, part.c_attn.w, part.c_attn.b)  # [T, C] -> [T, 3 * Hp * D]
    q, k, v = (ops.split_heads(t, Hp) for t in np.split(qkv, 3, axis=-1))  # 3 x [Hp, T, D]
    a = ops.merge_heads(ops.causal_attention(q, k, v))  # [Hp, T, D] -> [T, Hp * D]
    return ops.linear(a, part.attn_proj.w, part.attn_proj.zero)  # [T, Hp * D] @ [Hp * D, C] -> [T, C]


def mlp_partial(x: np.ndarray, part) -> np.ndarray:
    """One rank's MLP: its hidden units only; -> a partial sum [T, C]."""
    h = ops.layer_norm(x, part.ln_2.g, part.ln_2.b, eps)  # [T, C]
    h = ops.gelu(ops.linear(h, part.c_fc.w, part.c_fc.b))  # [T, C] -> [T, M]
    return ops.linear(h, part.mlp_proj.w, part.mlp_proj.zero)  # [T, M] @ [M, C] -> [T, C]


def sharded_block(x: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [s.blocks[i] for s in shards]
    x = x + sum(attention_partial(x, p) for p in parts) + parts[0].attn_proj.b  # all-reduce 1, then the bias
    return x, x + sum(mlp_partial(x, p) for p in parts) + parts[0].mlp_proj.b  # all-reduce 2


want_attn, want = whole_block(x, weights.blocks[0])
got_attn, got = sharded_block(x, 0)
print(f"after attention: max |sharded - whole| {np.abs(got_attn - want_attn).max():.1e}; "
      f"after the block: {np.abs(got - want).max():.1e} (values up to {np.abs(want).max():.1f})")  # fmt: skip
assert np.allclose(got_attn, want_attn, rtol=1e-5, atol=1e-5)
assert np.allclose(got, want, rtol=1e-5, atol=1e-5)

# %% [markdown]
# Equal to rounding, not bit for bit: a row-parallel layer adds the N
# partial sums at the end, so each output is summed over K in another order
# than one matrix product sums it (lesson 8). What matters for fusion is
# that this order is the same for every step and every batch.
#
# ## The embedding and the LM head, split by vocabulary
#
# GPT-2's token table `wte` [V, C] is also its LM head (lesson 1). In the
# small model of these lessons it is a few percent of the weights; in GPT-2
# 124M, with its 50257 tokens, far more. We count every number in the
# loaded model, check the count against `flover.sim.shapes.ModelShape`, the
# formula flover's simulator (lesson 4) prices models with, and then ask
# that formula about GPT-2's shapes, which would take half a gigabyte to
# allocate. Every weight is a 4-byte float32, so a share of the numbers is
# a share of the bytes.

# %%
from dataclasses import is_dataclass

from flover.sim.shapes import ModelShape, model_shape


def n_parameters(record) -> int:
    """Every number in a weights record: its arrays, its lists of records, the records inside it."""
    if isinstance(record, np.ndarray):
        return record.size
    if isinstance(record, list):
        return sum(n_parameters(item) for item in record)
    if is_dataclass(record):
        return sum(n_parameters(getattr(record, f.name)) for f in fields(record))
    return 0


assert n_parameters(weights) == ModelShape("loaded", config).parameters(), "the formula counts what the model holds"
GPT2 = model_shape("gpt2")
wte_share = GPT2.config.vocab_size * GPT2.config.n_embd / GPT2.parameters()
print(f"wte: {weights.wte.size / n_parameters(weights):.1%} of the loaded model's bytes, "
      f"{wte_share:.1%} of GPT-2 124M's ({GPT2.parameters() * 4 / 1e6:.0f} MB)")  # fmt: skip
assert 0.30 < wte_share < 0.32

# %% [markdown]
# So flover splits it too, by vocabulary rows (**vocabulary-parallel**):
# `mpi_tp.vocab_bounds(V, N)` gives rank r the rows bounds[r] .. bounds[r+1]
# - 1 (its `vocab_lo` and `vocab_hi`).
#
# - The embedding lookup: each rank looks up the tokens it owns and puts
#   zeros for the others; an all-reduce adds the ranks' rows. Adding zeros
#   is exact, so this equals `wte[tokens]` bit for bit.
# - The LM head: rank r computes the logits of its own vocabulary columns,
#   x @ wte[lo:hi].T, and rank 0 gathers them side by side.

# %%
from mpi_tp import vocab_bounds

bounds = vocab_bounds(V, WORLD)
print("vocabulary rows per rank:", [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])])
assert [(s.vocab_lo, s.vocab_hi) for s in shards] == list(zip(bounds[:-1], bounds[1:]))


def embed_partial(tokens: np.ndarray, s) -> np.ndarray:
    owned = (tokens >= s.vocab_lo) & (tokens < s.vocab_hi)  # [T]
    return np.where(owned[:, None], s.wte[np.where(owned, tokens - s.vocab_lo, 0)], 0).astype(np.float32)  # [T, C]


assert np.array_equal(sum(embed_partial(tokens, s) for s in shards), weights.wte[tokens])

# %% [markdown]
# With every piece split, the whole model: the embedding, all blocks, the
# final layer norm and the gathered logits, against `reference.forward`.

# %%
from reference import forward

x = sum(embed_partial(tokens, s) for s in shards) + shards[0].wpe[np.arange(T)]  # [T, C]
for i in range(config.n_layer):
    x = sharded_block(x, i)[1]
x = ops.layer_norm(x, shards[0].ln_f.g, shards[0].ln_f.b, eps)  # [T, C]
logits = np.concatenate([x @ s.head_w for s in shards], axis=-1)  # N x [T, C] @ [C, V_r] -> [T, V]
expected = forward(weights, config, tokens)  # [T, V]
print(f"sharded logits vs reference.forward: max |difference| {np.abs(logits - expected).max():.1e}")
assert np.allclose(logits, expected, rtol=1e-4, atol=1e-4)
assert np.array_equal(logits.argmax(axis=-1), expected.argmax(axis=-1))

# %% [markdown]
# ## The sum over ranks, in a fixed order
#
# Megatron adds the partial products with MPI's all-reduce. flover does
# not, quite. The MPI standard lets a library add the ranks' parts in any
# order it likes (it assumes the sum associative, and warns that for
# floating-point addition the result may then change), and libraries pick
# their algorithm by the number of ranks and the message size. A decode
# step's message is [B, C] floats, so its size changes with the batch, and
# so could the rounding. That would break lesson 8's promise: a request's
# logits must not depend on its batch. Nor does MPI promise every rank the
# same bits, and the ranks' copies of x must never drift apart.
#
# With two ranks there is only one sum: float addition is commutative, so
# p0 + p1 and p1 + p0 are the same bits. From three ranks on, the grouping
# matters (lesson 8). Four ranks' parts of one number, added in rank order
# and in pairs (as a tree of messages adds them: ranks 0 and 1 meet, 2 and
# 3 meet, then the two pairs):

# %%
parts = np.array([1.0, 1e8, -1e8, 1.0], np.float32)  # p0 .. p3, one element of four ranks' partial sums
in_rank_order = ((parts[0] + parts[1]) + parts[2]) + parts[3]
in_pairs = (parts[0] + parts[1]) + (parts[2] + parts[3])
print(f"parts {parts.tolist()}: rank order {in_rank_order}, pairs {in_pairs}, exact {parts.astype(np.float64).sum()}")

# %% [markdown]
# So `mpi_tp.TPComm.reduce_sum` gathers every rank's partial (an allgather)
# and adds them in rank order, ((p0 + p1) + p2) + ..., on every rank. The
# order then depends only on the number of ranks: every rank gets the same
# bits, for every batch. Here it is (`TPComm` is one rank's view of the
# world, and `seconds` counts its time in MPI calls):

# %%
from mpi_tp import TPComm

print(inspect.getsource(TPComm.reduce_sum))

# %% [markdown]
# ## The rank-order sum, written by hand
#
# Our own version is a few lines of mpi4py on NumPy buffers. The script
# below runs on every rank: it makes a partial sum of its own, [B, C]
# random floats seeded by its rank, then
#
# - allgathers the partials into an [N, B, C] buffer and adds them in rank
#   order (our reduction);
# - asks flover's `TPComm.reduce_sum` for the same sum, and for the sum of
#   its first row alone, as a batch of one;
# - and asks MPI's `Allreduce` for it, in whatever order MPICH picks;
#
# and each rank saves its partial and the three sums to a file, for us to
# compare here.

# %%
SUM_SCRIPT = """
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpi_tp import TPComm

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
rows, width, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
partial = np.random.default_rng(rank).standard_normal((rows, width), dtype=np.float32)  # this rank's [B, C]

gathered = np.empty((world, rows, width), np.float32)  # [N, B, C]
comm.Allgather(partial, gathered)  # every rank receives every rank's partial
total = gathered[0].copy()
for part in gathered[1:]:
    total += part  # ((p0 + p1) + p2) + ...: rank order

flover_sum = TPComm(comm).reduce_sum(partial)
flover_row0 = TPComm(comm).reduce_sum(partial[:1])  # the first row alone: a batch of 1
mpi_sum = np.empty_like(partial)
comm.Allreduce(partial, mpi_sum, op=MPI.SUM)  # MPI's order
np.savez(out / f"sum_{world}_{rank}.npz", partial=partial, total=total, flover=flover_sum, flover_row0=flover_row0,
         mpi=mpi_sum)
"""
sum_script = OUT / "10_rank_order_sum.py"
sum_script.write_text(SUM_SCRIPT)

# %% [markdown]
# We run it with `python -m mpi4py script.py`, which makes an error on any
# rank end the whole job instead of leaving the other ranks waiting forever.
#
# And with one thread per rank. Each rank is a separate Python process with
# its own libraries: NumPy's matrix products run in OpenBLAS (the BLAS of
# lesson 1), and Numba's parallel loops here run on **OpenMP**, a common
# way for C and Fortran code to split a loop over threads. Each starts as
# many threads as the machine has cores unless told otherwise, so two ranks
# on two cores would run four threads fighting over two cores.
# `OMP_NUM_THREADS=1` tells OpenMP code to use one thread (and OpenBLAS
# too, where its own `OPENBLAS_NUM_THREADS` is unset: this process set that
# one above, and the ranks inherit it); `NUMBA_NUM_THREADS=1` tells Numba.
#
# We run the script twice, over 2 ranks and over 4 (four processes on this
# machine's cores: the messages are small).

# %%
import subprocess

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def mpirun(world: int, *args: str) -> str:
    """``mpiexec -n world python -m mpi4py *args``; -> what rank 0 (and the others) printed."""
    job = subprocess.run([MPIEXEC, "-n", str(world), sys.executable, "-m", "mpi4py", *args],
                         capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    return job.stdout


ROWS, WIDTH = 4, GPT2.config.n_embd  # a decode step of 4 requests at GPT-2's width
runs = {}
for world in (2, 4):
    mpirun(world, str(sum_script), str(ROWS), str(WIDTH), str(OUT))
    runs[world] = [dict(np.load(OUT / f"sum_{world}_{rank}.npz")) for rank in range(world)]

# %% [markdown]
# On every rank, ours and flover's are the same bits, and every rank has
# the same sum; the first row, summed alone, has the bits it has in the
# batch of four. Adding the saved partials in rank order in this process,
# another run on another day, gives those bits again: the sum depends on the
# partials and the number of ranks, nothing else. MPI's sum agrees over two
# ranks; over four, it does not.

# %%
mpi_differs = {}  # world -> elements where Allreduce's sum is not the rank-order sum
for world, ranks in runs.items():
    ours = ranks[0]["total"]
    here = ranks[0]["partial"].copy()
    for r in ranks[1:]:
        here += r["partial"]
    assert all(np.array_equal(r["total"], r["flover"]) for r in ranks), "ours == TPComm.reduce_sum, on every rank"
    assert all(np.array_equal(r["total"], ours) for r in ranks), "every rank has the same bits"
    assert all(np.array_equal(r["flover_row0"][0], r["flover"][0]) for r in ranks), "a row alone == in its batch"
    assert np.array_equal(here, ours), "the rank-order sum, redone in this process"
    mpi_differs[world] = int((ranks[0]["mpi"] != ours).sum())
    print(f"{world} ranks: ours == flover's on all {world} ranks; Allreduce differs from the rank order "
          f"in {mpi_differs[world]} of {ours.size} elements")  # fmt: skip
p = np.stack([r["partial"] for r in runs[4]])  # [4, B, C]
in_pairs = (p[0] + p[1]) + (p[2] + p[3])  # [B, C]
pairs_everywhere = all(np.array_equal(r["mpi"], in_pairs) for r in runs[4])
print("4 ranks: Allreduce == (p0 + p1) + (p2 + p3) on every element, on every rank:", pairs_everywhere)
assert mpi_differs[2] == 0, "two ranks: one possible sum"
assert mpi_differs[4] > 0 and pairs_everywhere, "four ranks: this MPICH adds in pairs (if it changed, so must this text)"

# %% [markdown]
# Here MPICH adds four ranks' parts in pairs, as a tree of messages does:
# ranks 0 and 1 exchange and add while ranks 2 and 3 do, then the two pairs
# exchange and add. Fewer rounds of messages, another rounding. That is
# MPICH's choice to make and to change; the rank-order sum leaves it none.
#
# The price: an allgather brings each rank N - 1 partials of [B, C] floats.
# An all-reduce can do with less for many ranks (each rank adds up 1/N of
# the elements and passes its piece on, under two partials' worth in all),
# but for N = 2 both bring each rank one partial. How much is that?
#
# ## What crosses between ranks
#
# One rank's step, `NumpyShard.step` in `mpi_tp/model.py`, is the model's
# step over a list of lanes (lesson 2) on the rank's heads, MLP units and
# vocabulary rows, with a `reduce_sum` after each row-parallel layer and in
# the embedding:

# %%
from mpi_tp import NumpyShard

print(inspect.getsource(NumpyShard.step))
print(inspect.getsource(NumpyShard.row_parallel))

# %% [markdown]
# Rather than count those calls by eye, we count them as they run. A world
# of one rank (`MPI.COMM_SELF`) makes every reduction a no-op, so one
# process can run a shard; a `TPComm` that notes the shape of each partial
# it is handed counts them. One step of two prompt lanes:

# %%
from reference import KVShape, Lane, plan_rows


class CountingComm(TPComm):
    """A world of one rank that notes the shape of every partial sum it is asked to add."""

    def __init__(self) -> None:
        super().__init__(MPI.COMM_SELF)
        self.reduced: list[tuple[int, ...]] = []

    def reduce_sum(self, partial: np.ndarray) -> np.ndarray:
        self.reduced.append(partial.shape)
        return super().reduce_sum(partial)


counting = CountingComm()
kv = KVShape.slots(config, 2)
shard = NumpyShard(config, shard_weights(config, weights, 0, 1), kv, counting)
rows = plan_rows(config, kv, [Lane.of([0], tokens, 0), Lane.of([1], tokens[:3], 0)])  # T + 3 rows, 2 lanes
local_logits = shard.step(rows)  # [L, V_r]: this rank's vocabulary columns, gathered on rank 0
n_rows = len(rows.tokens)
print(f"a step of {n_rows} rows: {len(counting.reduced)} reductions, shapes {sorted(set(counting.reduced))}; "
      f"logit columns to gather: {local_logits.shape}")  # fmt: skip
assert counting.reduced == [(n_rows, C)] * (1 + 2 * config.n_layer), "the embedding's, then two per block"
assert local_logits.shape == (2, V)

# %% [markdown]
# So a step of B rows sends, per rank: one [B, C] reduction for the
# embedding, two per block, the logits of its vocabulary columns to rank 0,
# and rank 0's command (the rows' tokens and positions, a few integers per
# row, lesson 2's lanes flattened). Against that, each rank reads its share
# of every weight matrix once per step. For GPT-2's shapes and two ranks:

# %%
c, m, V2, L2 = GPT2.config.n_embd, GPT2.config.d_mlp, GPT2.config.vocab_size, GPT2.config.n_layer
matrices = (c * 3 * c + c * c + c * m + m * c) // WORLD * 4  # bytes of one block's four matrices on one rank
rank1_columns = int(np.diff(vocab_bounds(V2, WORLD))[1])  # rank 1's vocabulary rows of GPT-2


def received(batch: int) -> int:
    """Bytes one rank receives in one reduction of [batch, C] float32 (the other ranks' partials)."""
    return (WORLD - 1) * batch * c * 4


def kb(nbytes: float) -> str:
    return f"{nbytes / 1e3:,.0f} kB" if nbytes < 1e6 else f"{nbytes / 1e6:,.1f} MB"


print(f"{'per step, one rank, GPT-2 over 2 ranks':42s} {'shape':18s} {'batch 1':>10s} {'batch 32':>10s}")
for what, shape, size in [
    ("embedding reduction (received)", "[B, 768]", received),
    (f"2 reductions per block x {L2} (received)", "[B, 768] each", lambda b: 2 * L2 * received(b)),
    ("logits to rank 0 (sent by rank 1)", f"[B, {rank1_columns}]", lambda b: b * rank1_columns * 4),
    ("weights read (its share of every matrix)", "", lambda b: L2 * matrices + rank1_columns * c * 4),
]:
    print(f"{what:42s} {shape:18s} {kb(size(1)):>10s} {kb(size(32)):>10s}")

# %% [markdown]
# Kilobytes of messages, a few megabytes at batch 32, against a quarter of
# a gigabyte of weights that every step reads. One block, in pictures (the
# diagram shows both ranks' layers with their shapes; the bars the bytes of
# one block on one rank, on a log scale):

# %%
stages = ["ln_1", f"c_attn\n[{c}, {3 * c // WORLD}]", f"attention\n{GPT2.config.n_head // WORLD} heads",
          f"attn_proj\n[{c // WORLD}, {c}]", "+", "ln_2", f"c_fc\n[{c}, {m // WORLD}]", "gelu",
          f"mlp_proj\n[{m // WORLD}, {c}]", "+"]  # fmt: skip
x_of = 1.7 * np.arange(len(stages))  # where each stage sits in the diagram
fig, (diagram, bars) = plt.subplots(1, 2, figsize=(16, 3.8), gridspec_kw={"width_ratios": [2.8, 1], "wspace": 0.4})
for rank, y in ((0, 1.0), (1, 0.0)):
    diagram.plot([x_of[0], x_of[-1]], [y, y], color="lightgray", zorder=0)
    diagram.text(-0.7, y, f"rank {rank}\nx [B, {c}]", ha="right", va="center", fontsize=9)
    for x_at, label in zip(x_of, stages):
        box = dict(boxstyle="circle", fc="#f28e2b", ec="none") if label == "+" else dict(boxstyle="round", fc="#d4e6f5")
        diagram.text(x_at, y, label, ha="center", va="center", fontsize=8, bbox=box)
for x_at in [x for x, label in zip(x_of, stages) if label == "+"]:
    diagram.annotate("", xy=(x_at, 0.18), xytext=(x_at, 0.82), arrowprops=dict(arrowstyle="<->", color="#f28e2b", lw=2))
    diagram.text(x_at - 0.15, 0.5, f"allgather of\npartials [B, {c}]\n{kb(received(1))} at B = 1\n"
                 f"{kb(received(32))} at B = 32", ha="right", va="center", fontsize=7.5)  # fmt: skip
diagram.set(xlim=(-2.0, x_of[-1] + 0.6), ylim=(-0.4, 1.4), xticks=[], yticks=[],
            title="one GPT-2 block over 2 ranks: what crosses between them")  # fmt: skip
for side in diagram.spines.values():
    side.set_visible(False)
labels = ["weights read", "2 reductions, B = 1", "2 reductions, B = 32", "2 reductions,\n512-token prompt"]
sizes = [matrices, 2 * received(1), 2 * received(32), 2 * received(512)]
bars.barh(labels[::-1], sizes[::-1], color=["#f28e2b"] * 3 + ["#4e79a7"])
bars.set(xscale="log", xlabel="bytes per block, one rank", title="one block, one rank")
for y, size in enumerate(sizes[::-1]):
    bars.text(size, y, f" {kb(size)}", va="center", fontsize=8)
show(fig, "10_tp_traffic.png")

# %% [markdown]
# ## Running it for real
#
# Under `mpiexec` every rank runs the same script. Each calls
# `mpi_tp.launch(config, weights, n_slots)` with the same model:

# %%
from mpi_tp import launch

print(inspect.getsource(launch))

# %% [markdown]
# Every rank keeps only its shard and KV slots for its own heads (a
# `NumpyShard`, or a GPU shard with `inner="numba"`, lesson 9's kernels).
# Ranks 1 .. N-1 then stay inside `serve`, running rank 0's commands, and
# return None when it is done. Rank 0 gets a `TPBackend`, a backend with
# lesson 2's protocol: each `step(lanes)` broadcasts one command holding the
# step's rows (their tokens and positions, and each lane's blocks), every
# rank runs that step on its shard with two reductions per block, and the
# logits are gathered on rank 0; `move` is another command, each rank
# moving its own heads' keys and values. `prefill` and `decode` are lanes,
# as on every backend. `backend.close()` lets the other ranks return from
# `launch`, and `backend.comm_seconds()` tells how long each rank has spent
# in MPI calls.
#
# Our script generates greedy tokens with lesson 2's `reference.generate`
# and prints a JSON line.

# %%
import json

GENERATE_SCRIPT = """
import json, sys
from flover.loading import resolve
from mpi_tp import launch
from reference import generate

config, weights, tokenizer = resolve(None)
backend = launch(config, weights, n_slots=1)  # every rank; only rank 0 returns a backend
if backend is not None:
    prompt = tokenizer.encode(sys.argv[1])
    first_logits = backend.prefill(0, prompt)  # [V]
    tokens = [int(t) for t in generate(backend, prompt, int(sys.argv[2]))]
    print(json.dumps({"world": backend.world, "tokens": tokens, "first_logits": first_logits.tolist(),
                      "comm_seconds": backend.comm_seconds().tolist()}))
    backend.close()
"""
generate_script = OUT / "10_tp_generate.py"
generate_script.write_text(GENERATE_SCRIPT)

prompt_text, n_new = "class Point:\n    def __init__(self", 24
lines = [line for line in mpirun(WORLD, str(generate_script), prompt_text, str(n_new)).splitlines() if line.startswith("{")]
assert len(lines) == 1, "only rank 0 prints"
tp = json.loads(lines[0])
print(f"{tp['world']} ranks: {tokenizer.decode(tp['tokens'])!r}")
print("seconds in MPI calls per rank:", [round(s, 3) for s in tp["comm_seconds"]])

# %% [markdown]
# The same prompt in this process, with lesson 2's `NumpyBackend`: the same
# tokens. Since the split model's logits equal the whole model's only to
# rounding, we also check why that is enough here: at every step the best
# token leads the second best by far more than the rounding differences.

# %%
from reference import NumpyBackend, generate

prompt = tokenizer.encode(prompt_text)
one = [int(t) for t in generate(NumpyBackend(config, weights, 1), prompt, n_new)]
assert tp["tokens"] == one, "TP tokens == single-process tokens"
print("single process:", repr(tokenizer.decode(one)), "(the same tokens)")


def smallest_lead(config, weights, prompt: list[int], tokens: list[int]) -> float:
    """The smallest margin, over the steps that chose ``tokens``, of the best logit over the second best."""
    steps = forward(weights, config, np.array(list(prompt) + tokens[:-1]))[len(prompt) - 1 :]  # [len(tokens), V]
    top2 = np.sort(steps, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


rounding = np.abs(np.array(tp["first_logits"], np.float32) - forward(weights, config, np.array(prompt))[-1]).max()
gap = smallest_lead(config, weights, prompt, one)
print(f"TP vs one process, first logits: max |difference| {rounding:.1e}; smallest top-1 lead over top-2: {gap:.1e}")
assert rounding < 1e-4 and gap > 100 * rounding

# %% [markdown]
# ## `flover bench` under MPI
#
# `flover bench`, which served lesson 4's instances, is `run_policy` on the
# command line: it makes a Poisson trace from its flags (or reads one with
# `--trace`), serves it under `--policy`, and prints one row per policy
# (throughput in tok/s; `x fused`, fused throughput over this row's;
# latency, TTFT and TPOT; makespan; the mean batch; the share of idle
# rows). With `--tp`, under `mpiexec`, it serves from a `TPBackend`; only
# rank 0 prints, and it adds one line: the seconds each rank spent in MPI
# calls since launch (warm-up included), against the serving time. A rank
# waiting inside a collective for a slower rank counts that wait too, so on
# a machine whose cores are busy with other work the share can pass 100%;
# with a free core per rank it is small. `--json` writes every request's
# tokens.

# %%
ARGS = ["--model", "tiny", "--policy", "fused", "--slots", "4", "--requests", "8", "--rate", "200",
        "--prompt-len", "4:10", "--output-len", "4:12", "--seed", "5", "--quiet"]  # fmt: skip
bench = mpirun(WORLD, "-m", "flover.cli", "bench", "--tp", *ARGS, "--json", str(OUT / "10_tp_bench.json"))
print(bench)
assert bench.count("fused (slots 4)") == 1 and f"communication over {WORLD} ranks" in bench

# %% [markdown]
# The `tiny` preset here has random weights (lesson 1); the tokens still
# must match. The same trace, served serially in this process under lesson
# 4's virtual clock, gives every request the tokens the two ranks gave it
# (and, as above, no step was close enough to a tie for rounding to matter).

# %%
from flover.clock import VirtualClock
from flover.runner import PolicyConfig, run_policy
from flover.trace import poisson_trace

tiny_config, tiny_weights, _ = resolve("tiny")
trace = poisson_trace(200.0, 8, (4, 10), (4, 12), seed=5, vocab_size=tiny_config.vocab_size)
serial = run_policy(PolicyConfig("serial"), lambda n: NumpyBackend(tiny_config, tiny_weights, n), trace,
                    clock=VirtualClock())  # fmt: skip
tp_tokens = {r["id"]: r["tokens"] for r in json.loads((OUT / "10_tp_bench.json").read_text())["requests"]}
assert tp_tokens == {r.id: r.tokens for r in serial.results}
lead = min(smallest_lead(tiny_config, tiny_weights, r.prompt_ids, tp_tokens[r.id]) for r in trace)
print(f"all {len(tp_tokens)} requests: TP fused tokens == single-process serial tokens (smallest lead {lead:.1e})")
assert lead > 1e-3, "no step was a near tie that rounding could flip"

# %% [markdown]
# ## Several machines
#
# Nothing above assumes one machine. With MPICH's launcher, passwordless ssh
# between the nodes, and the same virtual environment at the same path on
# each, list the nodes and how many ranks each runs in a **hostfile** and
# pass it with `-f`:
#
#     $ cat hosts
#     node1:2
#     node2:2
#     $ mpiexec -f hosts -n 4 python -m mpi4py -m flover.cli bench --tp ...
#
# A rank waiting for a reduction or for rank 0's next command keeps polling,
# so give each rank a core of its own and one thread (`OMP_NUM_THREADS=1
# NUMBA_NUM_THREADS=1`, as above). The number of ranks must divide `n_head`
# and `d_mlp`; `mpi_tp.check_world(config, world)` raises a ValueError that
# says so otherwise, and `flover` prints it as one line.
#
# ## What we have
#
# - Megatron's split: `c_attn` and `c_fc` are ColumnParallelLinear (`c_attn`
#   by heads, n_head / N per rank), `attn_proj` and `mlp_proj`
#   RowParallelLinear, each followed by one reduction; the embedding and LM
#   head (31% of GPT-2's bytes) are split by vocabulary.
# - By hand, the ranks' partial products add up to the whole block and the
#   whole model, to rounding.
# - The reduction is an allgather and a sum in rank order, written by hand
#   in mpi4py and bitwise equal to flover's `TPComm.reduce_sum` on every
#   rank; MPICH's `Allreduce` adds four ranks' parts in another order.
# - A step's messages are kilobytes per block against megabytes of weights.
# - Under `mpiexec -n 2`, the split model generates the tokens of one
#   process, and `flover bench --tp` serves a trace with temporal fusion.
#   `tests/test_tp_mpi.py` checks more worlds, random models, and fused
#   against serial decoding bit for bit.
#
# Lesson 11 shows how to test a scheduler of your own.
