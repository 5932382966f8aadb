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
# by hand that the parts add up to the whole layer. Then it runs the split
# model for real, as two processes under MPI, and checks that it generates
# the same tokens as one process.

# %% [markdown]
# The helpers of lesson 1 (`OUT`, `show`, `show_file`), and one thread per
# process, as in lesson 2: below, two processes share this machine's cores.

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
# which brings MPICH and its `mpiexec` too), and flover's tensor parallelism
# lives in `mpi_tp/`.
# %%
import shutil
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from _display import OUT, show  # tutorials/_display.py
from mpi4py import MPI

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
if MPIEXEC is None:
    raise RuntimeError("this lesson needs mpiexec: pip install 'flover[mpi]' installs MPICH's")
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
# share out of the full weights: a `ShardWeights` whose `blocks` hold a
# `ColumnParallelLinear` (`w`, `b`) for `c_attn` and `c_fc` and a
# `RowParallelLinear` (`w`, `b`, and `zero`, a bias of zeros for the partial
# product) for `attn_proj` and `mlp_proj`; `n_head` is Hp. Here are both
# shards of the default model of lesson 1 for N = 2.

# %%
from flover.loading import resolve
from mpi_tp import ColumnParallelLinear, RowParallelLinear, shard_weights

config, weights, tokenizer = resolve(None)
WORLD = 2
C, H, D, V = config.n_embd, config.n_head, config.head_dim, config.vocab_size
Hp, M = H // WORLD, config.d_mlp // WORLD
shards = [shard_weights(config, weights, rank, WORLD) for rank in range(WORLD)]
block0 = shards[0].blocks[0]
for name in ("c_attn", "attn_proj", "c_fc", "mlp_proj"):
    part = getattr(block0, name)
    print(f"{name:9s} {type(part).__name__:20s} full {getattr(weights.blocks[0], name).w.shape} -> rank 0 {part.w.shape}")
print(f"heads per partition: {shards[0].n_head} of {H}")
assert all(s.n_head == Hp for s in shards)
assert isinstance(block0.c_attn, ColumnParallelLinear) and isinstance(block0.mlp_proj, RowParallelLinear)
assert block0.c_attn.w.shape == (C, 3 * Hp * D) and block0.attn_proj.w.shape == (Hp * D, C)
assert block0.c_fc.w.shape == (C, M) and block0.mlp_proj.w.shape == (M, C)

# %% [markdown]
# Which columns of `c_attn` went where? We find each of the full matrix's 3C
# columns among the ranks' columns: rank r got heads r*Hp .. (r+1)*Hp - 1 of
# q, of k and of v, so the picture shows each rank three times.

# %%
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
show(fig, "07_c_attn_split.png")

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
# GPT-2's token table `wte` [V, C] is also its LM head (lesson 1), and the
# largest single weight: 31% of the bytes of GPT-2 124M. flover splits it by
# vocabulary rows (**vocabulary-parallel**): `mpi_tp.vocab_bounds(V, N)`
# gives rank r the rows bounds[r] .. bounds[r+1] - 1 (its `vocab_lo` and
# `vocab_hi`).
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
# ## The all-reduce, in a fixed order
#
# Megatron sums the partial products with MPI's all-reduce. flover does not,
# quite. An MPI library picks its all-reduce algorithm by message size, and
# each algorithm adds the ranks' parts in its own order; a decode step's
# message is [B, C] floats, so its size changes with the batch, and so could
# the rounding. That would break lesson 8's promise: a request's logits must
# not depend on its batch. So `mpi_tp.TPComm.reduce_sum` gathers every
# rank's partial (an allgather) and adds them in rank order,
# ((p0 + p1) + p2) + ..., on every rank, exactly as `sharded_block` above
# does. Every rank gets the same bits, for every batch size. Each rank then
# receives N partial sums of [B, C] floats instead of one, kilobytes per
# step, against the megabytes of weights a step reads. (`launch(...,
# deterministic=False)` uses MPI's all-reduce instead, for comparison.)
#
# ## Running it for real
#
# Under `mpiexec` every rank runs the same script. Each calls
# `mpi_tp.launch(config, weights, n_slots)` with the same model: each rank
# keeps only its shard and KV slots for its own heads. Ranks 1 .. N-1 then
# stay inside `launch`, serving rank 0's commands, and return None when it
# is done. Rank 0 gets a `TPBackend`, a backend with lesson 2's protocol:
# each `step(lanes)` broadcasts one command holding the step's rows (their
# tokens and positions, and each lane's blocks), every rank runs that step
# on its shard with two reductions per block, and the logits are gathered
# on rank 0; `move` is another command, each rank moving its own heads'
# keys and values. `prefill` and `decode` are lanes, as on every backend. `backend.close()` lets the other ranks return from
# `launch`, and `backend.comm_seconds()` tells how long each rank has spent
# in MPI calls.
#
# Our script generates greedy tokens with lesson 2's `reference.generate`
# and prints a JSON line. We run it with `python -m mpi4py script.py`, which
# makes an error on any rank end the whole job instead of leaving the other
# ranks waiting forever, and one thread per rank.

# %%
import json
import subprocess

SCRIPT = """
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
script = OUT / "10_tp_generate.py"
script.write_text(SCRIPT)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}

prompt_text, n_new = "class Point:\n    def __init__(self", 24
job = subprocess.run([MPIEXEC, "-n", str(WORLD), sys.executable, "-m", "mpi4py", str(script), prompt_text, str(n_new)],
                     capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
assert job.returncode == 0, job.stderr[-3000:]
lines = [line for line in job.stdout.splitlines() if line.startswith("{")]
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
# rows). With `--tp`,
# under `mpiexec`, it serves from a `TPBackend`; only rank 0 prints, and it
# adds one line: the seconds each rank spent in MPI calls since launch
# (warm-up included), against the serving time. A rank waiting inside a
# collective for a slower rank counts that wait too, so on a machine whose
# cores are busy with other work the share can pass 100%; with a free core
# per rank it is small. `--json` writes every request's tokens.

# %%
ARGS = ["--model", "tiny", "--policy", "fused", "--slots", "4", "--requests", "8", "--rate", "200",
        "--prompt-len", "4:10", "--output-len", "4:12", "--seed", "5", "--quiet"]  # fmt: skip
bench = subprocess.run([MPIEXEC, "-n", str(WORLD), sys.executable, "-m", "mpi4py", "-m", "flover.cli", "bench", "--tp",
                        *ARGS, "--json", str(OUT / "07_tp_bench.json")],
                       capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
assert bench.returncode == 0, bench.stderr[-3000:]
print(bench.stdout)
assert bench.stdout.count("fused (slots 4)") == 1 and f"communication over {WORLD} ranks" in bench.stdout

# %% [markdown]
# The `tiny` preset here has random weights (lesson 1); the tokens still
# must match. The same trace, served serially in this process under lesson
# 3's virtual clock, gives every request the tokens the two ranks gave it
# (and, as above, no step was close enough to a tie for rounding to matter).

# %%
from flover.clock import VirtualClock
from flover.runner import PolicyConfig, run_policy
from flover.trace import poisson_trace

tiny_config, tiny_weights, _ = resolve("tiny")
trace = poisson_trace(200.0, 8, (4, 10), (4, 12), seed=5, vocab_size=tiny_config.vocab_size)
serial = run_policy(PolicyConfig("serial"), lambda n: NumpyBackend(tiny_config, tiny_weights, n), trace,
                    clock=VirtualClock())  # fmt: skip
tp_tokens = {r["id"]: r["tokens"] for r in json.loads((OUT / "07_tp_bench.json").read_text())["requests"]}
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
# NUMBA_NUM_THREADS=1`). The number of ranks must divide `n_head` and
# `d_mlp`; `mpi_tp.check_world(config, world)` raises a ValueError that
# says so otherwise, and `flover` prints it as one line.
#
# ## What we have
#
# - Megatron's split: `c_attn` and `c_fc` are ColumnParallelLinear (`c_attn`
#   by heads, n_head / N per rank), `attn_proj` and `mlp_proj`
#   RowParallelLinear, each followed by one all-reduce; the embedding and LM
#   head are split by vocabulary.
# - By hand, the ranks' partial products add up to the whole block and the
#   whole model, to rounding.
# - flover's all-reduce adds the parts in rank order, so a request's logits
#   do not depend on its batch under tensor parallelism either.
# - Under `mpiexec -n 2`, the split model generates the tokens of one
#   process, and `flover bench --tp` serves a trace with temporal fusion.
#   `tests/test_tp_mpi.py` checks more worlds, random models, and fused
#   against serial decoding bit for bit.
#
# Lesson 11 shows how to test a scheduler of your own.
