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
# # Lesson 3: the roofline
#
# Lesson 2 ended on a claim: in a big model a decode step is bound by
# reading the weights, so a step for many requests costs little more than a
# step for one. This lesson makes that precise. It counts, from the model's
# shapes, the bytes a decode step of GPT-2 (124M) moves and the arithmetic it
# does, checks the count against the project's simulator, and places the step
# on the **roofline** of two machines: this CPU, measured, and a datacenter
# GPU, modelled. The answer decides how much any serving *policy* (how a
# server groups requests into steps: one at a time, in batches, or fused as
# lesson 4 does) can gain by batching requests together.

# %% [markdown]
# The helpers of lesson 2: `show(fig, name)` for pictures, and one thread
# per process, so that timings stay steady on a busy machine.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

# One thread per process, set before NumPy and Numba load: on a small model and a
# busy machine, parallel kernels spend more time waiting for each other than
# computing, and timings jump. Set these variables yourself to use more threads.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import inspect

import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py

# %% [markdown]
# ## Two limits: bytes and arithmetic
#
# An operation on a processor (a *kernel*: a matrix product, a layer norm)
# has to do two things: bring its operands from main memory to the
# arithmetic units, and compute. Count the second in **FLOPs**, floating-point
# operations (one multiply or one add), and the first in bytes. A processor
# has two matching limits:
#
# - its **peak FLOP/s**, the most arithmetic it can do per second;
# - its **memory bandwidth**, the most bytes per second it can read from main
#   memory.
#
# So an op takes at least `bytes / bandwidth` seconds and at least
# `FLOPs / peak` seconds. If the processor overlaps the two (it streams the
# next operands while it computes the current ones), it takes the longer of
# them. Divide the op's FLOPs by its bytes: that is its **arithmetic
# intensity**, in FLOPs per byte. The FLOP rate the op can reach is then
#
#     attainable FLOP/s = min(peak, intensity x bandwidth)
#
# which, drawn against intensity on log axes, is a slope that meets a flat
# roof: the **roofline** (Williams, Waterman and Patterson, 2009). The corner
# lies at intensity `peak / bandwidth`, the **ridge point**. An op left of it
# is **memory-bound**: its time is its bytes over the bandwidth, and extra
# arithmetic is free. An op right of it is **compute-bound**: its time is its
# FLOPs over the peak.
#
# A **GPU** (graphics processing unit) is a processor with many thousands of
# simple arithmetic units and memory of its own, stacked next to the chip
# (HBM, high-bandwidth memory). The project's simulator keeps each device's
# public figures in a data file, with the source of every number:
# `flover/sim/devices/h100-sxm.json` describes NVIDIA's H100 SXM, read by
# `flover.sim.load_device`. It runs models in **fp16**, 16-bit floats of 2
# bytes each (our NumPy model uses fp32, 4 bytes).
# %%
from flover.sim import load_device

h100 = load_device("h100-sxm")
h100_peak = h100.peak_flops("fp16")  # FLOP/s
h100_bandwidth = h100.figure("memory_bandwidth_gb_s") * 1e9  # bytes/s
h100_ridge = h100_peak / h100_bandwidth
print(f"{h100.description}: {h100_peak / 1e12:.1f} TFLOP/s (fp16), {h100_bandwidth / 1e9:.0f} GB/s "
      f"-> ridge point at {h100_ridge:.0f} FLOPs per byte")  # fmt: skip
print("source of the bandwidth:", h100.sources["memory_bandwidth_gb_s"])

# %% [markdown]
# An H100 must do about 300 FLOPs on every byte it reads to keep its
# arithmetic units busy. Where does a decode step stand?
#
# ## Counting a decode step by hand
#
# Take the shape of GPT-2 124M (the `gpt2` preset of `reference`): 12
# layers, C = 768, an MLP of d_mlp = 4C, V = 50257 tokens. A decode step for
# B requests runs B rows (one new token each) through the model, and each
# request attends over its own cached positions. Its bytes are of three
# kinds:
#
# 1. **weights**, read once per step *whatever B*: in each layer the four
#    matrices of lesson 1 (`c_attn` C x 3C, `attn_proj` C x C, `c_fc`
#    C x d_mlp, `mlp_proj` d_mlp x C), and the LM head (C x V, the embedding
#    read again, since GPT-2 ties them). Biases, norms and the position
#    embedding are too small to count.
# 2. **KV cache**, read per request: in each layer, K and V (C numbers each)
#    of every position the request attends over.
# 3. **activations**, per row: what each op reads and writes for one token.
#    Per layer: the QKV matrix reads C and writes 3C; attention reads q (C),
#    writes the new K and V (2C) and its output (C); the output matrix C in,
#    C out; the MLP's two matrices C in, d_mlp out and back; the two layer
#    norms C in, C out each; the two residual adds 2C in, C out each; GELU
#    d_mlp in and out. That is 22C + 4 d_mlp values. The embedding row (C)
#    comes in once, and per request the final norm (C in, C out) and the
#    logits (V out).
#
# And its FLOPs: a matrix product does one multiply and one add per weight
# per row, **2 FLOPs per weight per row**; the LM head runs on each
# request's last row only. Attention does 4C per attended position (q . k
# and the weighted sum of v, 2 FLOPs per number each). The norms and adds
# cost about 10 FLOPs per value of C, GELU about 8 per value of d_mlp.

# %%
from reference import preset

gpt2 = preset("gpt2")


def layer_weights(config) -> int:
    c, m = config.n_embd, config.d_mlp
    return 3 * c * c + c * c + c * m + m * c  # c_attn, attn_proj, c_fc, mlp_proj


def weight_count(config) -> int:
    return config.n_layer * layer_weights(config) + config.n_embd * config.vocab_size  # + the LM head


def decode_counts(config, batch: int, position: int, value_bytes: int) -> tuple[int, int]:
    """(bytes, FLOPs) of one decode step: ``batch`` requests, each feeding a token at ``position``."""
    c, m, v, layers = config.n_embd, config.d_mlp, config.vocab_size, config.n_layer
    weights = weight_count(config)
    attended = batch * (position + 1)  # positions read from the KV cache, over all requests
    kv = layers * 2 * c * attended
    activations = batch * (layers * (22 * c + 4 * m) + c) + batch * (2 * c + v)
    flops = (2 * batch * layers * layer_weights(config) + 2 * batch * c * v
             + layers * 4 * c * attended + batch * layers * (10 * c + 8 * m))  # fmt: skip
    return value_bytes * (weights + kv + activations), flops


for batch in (1, 32):
    nbytes, flops = decode_counts(gpt2, batch, position=48, value_bytes=2)
    weights_share = 2 * weight_count(gpt2) / nbytes
    print(f"batch {batch:2d}, fp16: {nbytes / 1e6:6.1f} MB ({weights_share:.0%} weights), {flops / 1e9:5.2f} GFLOPs, "
          f"intensity {flops / nbytes:5.1f} FLOPs/byte")  # fmt: skip

# %% [markdown]
# ## The simulator counts the same
#
# The project's simulator (`flover.sim`, which prices runs on machines we
# do not have) prices a step from its lanes with a **cost model**,
# `flover.sim.cost`. `layer_work` lists, for one layer, the bytes and FLOPs
# of each op; `head_work` those of the LM head. Here they are.

# %%
from flover.sim import StepShape, model_shape
from flover.sim.cost import head_work, layer_work

print(inspect.getsource(layer_work))
print(inspect.getsource(head_work))

# %% [markdown]
# `StepShape.decode(batch, position)` is the shape of a decode step (rows,
# lanes, cached positions read, positions attended), and `model_shape("gpt2")`
# the 124M shape. Summed over the layers, the cost model's counts equal ours
# exactly, for both data types and every batch.

# %%
shape = model_shape("gpt2")
print(f"{shape.name}: {shape.parameters() / 1e6:.1f}M parameters")


def cost_model_counts(s: StepShape, value_bytes: int) -> tuple[float, float]:
    """(bytes, FLOPs) of a step of shape ``s``, summed from the cost model's ops."""
    ops = layer_work(shape, s, value_bytes=value_bytes).values()
    head = head_work(shape, s, value_bytes=value_bytes)
    layers = shape.config.n_layer
    return layers * sum(w.bytes for w in ops) + head.bytes, layers * sum(w.flops for w in ops) + head.flops


BATCHES = [1, 2, 4, 8, 16, 32]
for value_bytes in (2, 4):
    for batch in BATCHES:
        assert decode_counts(shape.config, batch, 48, value_bytes) == cost_model_counts(StepShape.decode(batch, 48), value_bytes)
print("hand counts == the cost model's, fp16 and fp32, batch", BATCHES)

# %% [markdown]
# ## Intensity against batch
#
# Each request adds 2 FLOPs per weight but no weight bytes, so as long as
# the weights dominate the bytes, the intensity grows with B: about B FLOPs
# per byte in fp16 (2B FLOPs per weight over 2 bytes per weight), B / 2 in
# fp32. The KV cache changes that at long contexts: it is read per request,
# so it grows with B as the FLOPs do, and the intensity levels off.

# %%
many = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
intensity = {}
for position in (48, 1023):
    intensity[position] = [np.divide(*decode_counts(gpt2, b, position, 2)[::-1]) for b in many]
    print(f"context {position + 1:4d}, fp16:", "  ".join(f"B={b}: {i:.0f}" for b, i in zip(many, intensity[position])))
assert intensity[48][many.index(32)] < h100_ridge / 5, "a decode step of 32 is far left of the H100's ridge"
assert max(intensity[1023]) < h100_ridge / 10, "at full context the KV cache keeps it there at any batch"

# %% [markdown]
# A decode step of 32 requests is far left of the H100's ridge: it is
# memory-bound, and the H100 runs it at a small fraction of its peak. Even a
# thousand requests would not reach the ridge at full context, where every
# request's KV cache weighs more than a tenth of the weights.
#
# ## The roofline of this CPU
#
# Our CPU has no data sheet for what NumPy code reaches on it, so we
# measure its two limits, with the model itself: a NumPy backend (lesson 2)
# with random GPT-2 124M weights, whose KV memory is 32 blocks of 64
# positions (the requests below need only a few positions; full slots of
# 1024 would take 2.4 GB). Both limits come from the matrix product its
# steps run (`reference.invariant.matmul_rows`; lesson 8 tells why it is
# this one), each the fastest of a few calls:
#
# - bandwidth: one row times the LM head, 154 MB, far bigger than the CPU's
#   caches (its small, fast memories next to the arithmetic units, 32 MB
#   here at most). One row does 2 FLOPs per 4-byte weight, an intensity of
#   0.5, so the product is memory-bound: its time is the time to read the
#   matrix.
# - peak: 64 rows times one layer's `c_fc` (9.4 MB, which stays in the
#   caches), so the time is the arithmetic.

# %%
import timeit

from reference import KVShape, NumpyBackend, init_weights, invariant


def best_s(fn, *args, repeats: int = 5) -> float:
    """The fastest of a few calls fn(*args), in seconds."""
    return min(timeit.repeat(lambda: fn(*args), number=1, repeat=repeats))


THREADS = os.environ["NUMBA_NUM_THREADS"]
backend = NumpyBackend(gpt2, init_weights(gpt2, seed=0), KVShape(32, 64))
head, c_fc = backend.head, backend.step_weights.blocks[0].c_fc  # packed for the kernel: [C, V], [C, d_mlp]
one_row, rows = np.ones((1, gpt2.n_embd), np.float32), np.ones((64, gpt2.n_embd), np.float32)
invariant.matmul_rows(one_row, c_fc.w, c_fc.b)  # the first call compiles the kernel
cpu_bandwidth = 4 * gpt2.n_embd * gpt2.vocab_size / best_s(invariant.matmul_rows, one_row, head.w, head.b)
cpu_peak = 2 * 64 * gpt2.n_embd * gpt2.d_mlp / best_s(invariant.matmul_rows, rows, c_fc.w, c_fc.b, repeats=9)
cpu_ridge = cpu_peak / cpu_bandwidth
print(f"this CPU, {THREADS} thread(s): {cpu_peak / 1e9:.1f} GFLOP/s, {cpu_bandwidth / 1e9:.1f} GB/s "
      f"-> ridge point at {cpu_ridge:.1f} FLOPs per byte")  # fmt: skip
fp32_intensity = {b: np.divide(*decode_counts(gpt2, b, 48, 4)[::-1]) for b in BATCHES}
past = [b for b in BATCHES if fp32_intensity[b] > cpu_ridge]
print(f"fp32 decode steps right of this CPU's ridge: batch {', '.join(map(str, past)) if past else 'none up to 32'}")
assert h100_ridge > 10 * cpu_ridge

# %% [markdown]
# The CPU's ridge lies at a few FLOPs per byte, tens of times lower than
# the H100's: its arithmetic is slow next to its memory. A decode step of
# a few tens of requests reaches it (the line above says which batches on
# this machine), where a GPU's step stays far left, memory-bound.
#
# ## Timing decode steps on this CPU
#
# A decode step of B requests is B lanes of one token, each in a block of
# its own, at position 48. Each batch is timed a few times, the rounds
# interleaved so that a busy moment of the machine does not hit one batch
# only, and the fastest kept.

# %%
from reference import Lane

steps = {b: [Lane.of([i], [i], 48) for i in range(b)] for b in BATCHES}
backend.step(steps[1])
cpu_s = {b: float("inf") for b in BATCHES}
for _ in range(4):
    for b in BATCHES:
        cpu_s[b] = min(cpu_s[b], best_s(backend.step, steps[b], repeats=1))
for b in BATCHES:
    nbytes, flops = decode_counts(gpt2, b, 48, 4)
    print(f"batch {b:2d}: {cpu_s[b] * 1e3:6.1f} ms, {flops / cpu_s[b] / 1e9:5.1f} GFLOP/s, {nbytes / cpu_s[b] / 1e9:5.1f} GB/s")

# %% [markdown]
# ## The H100, modelled
#
# `flover.sim.CostModel(device, shape)` turns those counts into seconds: each
# op takes `max(bytes / bandwidth, FLOPs / peak)` (each figure times an
# efficiency: kernels reach about 85% of the bandwidth and 70% of the peak,
# the file says), plus a fixed cost per layer for the GPU's **kernel
# launches**: the host CPU tells the GPU to start each op, which takes some
# microseconds whatever the op's size. `compute_s` is the roofline part
# alone, `shape_s` the whole step. Everything it says is **simulated**: no
# GPU ran here.

# %%
from flover.sim import CostModel

h100_model = CostModel(h100, shape)
h100_s = {b: h100_model.shape_s(StepShape.decode(b, 48)) for b in BATCHES}
h100_roofline_s = {b: h100_model.compute_s(StepShape.decode(b, 48)) for b in BATCHES}
weights_s = 2 * weight_count(gpt2) / (h100_bandwidth * h100.figure("bandwidth_efficiency"))
for b in BATCHES:
    print(f"batch {b:2d}: step {h100_s[b] * 1e3:.3f} ms, of which memory and math {h100_roofline_s[b] * 1e6:5.1f} us "
          "(simulated)")  # fmt: skip
fixed_s = h100_model.overhead_s(StepShape.decode(1, 48))
print(f"reading the weights once: {weights_s * 1e6:.1f} us; fixed costs per step: {fixed_s * 1e3:.2f} ms (simulated)")
assert weights_s > 0.8 * h100_roofline_s[1], "at batch 1 the roofline part is reading the weights"
assert fixed_s > 0.5 * h100_s[1], "for GPT-2, launches are most of an H100 step"

# %% [markdown]
# For a model as small as GPT-2 the H100 spends most of a step launching
# kernels; of the rest, reading the weights is almost all at batch 1. Both
# costs are paid once per step, whatever the batch.
#
# ## One picture: a step of B against a step of 1
#
# Divide each device's step time by its time at batch 1.

# %%
cpu_ratio = {b: cpu_s[b] / cpu_s[1] for b in BATCHES}
h100_ratio = {b: h100_s[b] / h100_s[1] for b in BATCHES}
h100_roofline_ratio = {b: h100_roofline_s[b] / h100_roofline_s[1] for b in BATCHES}
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(BATCHES, list(cpu_ratio.values()), marker="o", label=f"this CPU, measured (fp32, {THREADS} thread(s))")
ax.plot(BATCHES, list(h100_ratio.values()), marker="s", label="H100 SXM, simulated (fp16): whole step")
ax.plot(BATCHES, list(h100_roofline_ratio.values()), marker="^", linestyle="--",
        label="H100 SXM, simulated: memory and math only")  # fmt: skip
ax.plot(BATCHES, BATCHES, color="grey", linewidth=0.8, label="B steps of 1 (no sharing)")
ax.set(xscale="log", yscale="log", xlabel="requests in the decode step (B)", ylabel="step time / step time at B = 1",
       title="GPT-2 124M decode step against batch (H100: simulated)")  # fmt: skip
ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
ax.legend(fontsize=8)
show(fig, "03_step_vs_batch.png")
print(f"step(32) / step(1): this CPU {cpu_ratio[32]:.1f}x, H100 {h100_ratio[32]:.2f}x "
      f"(memory and math only {h100_roofline_ratio[32]:.2f}x), simulated")  # fmt: skip
assert cpu_ratio[32] > 2 * h100_ratio[32], "this CPU pays for the batch, the H100 hardly"
assert h100_roofline_ratio[32] < 1.5, "on the H100 a step of 32 costs about what a step of 1 costs"

# %% [markdown]
# And on the roofline itself: both roofs, and a decode step at every batch
# at its intensity (fp16 on the H100, fp32 here). The hollow circles are what
# the CPU steps above reached, their FLOPs over their measured time.

# %%
grid = np.logspace(-1, 3.5, 200)
fig, ax = plt.subplots(figsize=(7, 4.5))
for name, peak, bandwidth, color in (("H100 SXM (data sheet)", h100_peak, h100_bandwidth, "#4e79a7"),
                                     ("this CPU (measured)", cpu_peak, cpu_bandwidth, "#e15759")):  # fmt: skip
    ax.plot(grid, np.minimum(peak, grid * bandwidth), color=color, label=f"roof: {name}")
    ax.axvline(peak / bandwidth, color=color, linestyle=":", linewidth=0.8)
h100_points = [np.divide(*decode_counts(gpt2, b, 48, 2)[::-1]) for b in BATCHES]
ax.plot(h100_points, np.minimum(h100_peak, np.array(h100_points) * h100_bandwidth), "s", color="#4e79a7",
        label="decode steps, B = 1 .. 32, on the H100's roof (fp16, modelled)")  # fmt: skip
cpu_points = list(fp32_intensity.values())
ax.plot(cpu_points, np.minimum(cpu_peak, np.array(cpu_points) * cpu_bandwidth), "o", color="#e15759",
        label="decode steps, B = 1 .. 32, on this CPU's roof (fp32)")  # fmt: skip
ax.plot(cpu_points, [decode_counts(gpt2, b, 48, 4)[1] / cpu_s[b] for b in BATCHES], "o", mfc="none",
        color="#e15759", label="reached on this CPU (measured)")  # fmt: skip
ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs per byte)", ylabel="FLOP/s",
       title="the roofline; dotted: ridge points")  # fmt: skip
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
show(fig, "03_roofline.png")

# %% [markdown]
# ## The ceiling of fusion
#
# A decode step of B requests makes B tokens, so the most tokens per second
# any policy can get from decode steps of B is `B / step(B)`. Against batch
# 1, batching multiplies *throughput* (tokens made per second, over all
# requests) by `B x step(1) / step(B)`: nearly B
# where a step is memory-bound, much less where it is compute-bound.

# %%
print(f"{'batch':>5s} {'CPU tokens/s':>13s} {'gain':>6s} {'H100 tokens/s (sim.)':>21s} {'gain':>6s}")
for b in BATCHES:
    print(f"{b:5d} {b / cpu_s[b]:13.0f} {b / cpu_ratio[b]:5.1f}x {b / h100_s[b]:21.0f} {b / h100_ratio[b]:5.1f}x")
assert 32 / h100_ratio[32] > 0.8 * 32, "on the H100 fusing 32 requests multiplies throughput nearly 32 times"
assert 32 / cpu_ratio[32] < 0.5 * 32 / h100_ratio[32], "on this CPU well under half of that"

# %% [markdown]
# So temporal fusion, which puts every request in flight into one decode
# step (lesson 4), can multiply a GPU's decode throughput by about the
# number of requests it fuses, while on this CPU it gains well under half
# as much: how much depends on the CPU (the table says, for this one).
#
# Prefill is another matter: a prompt of P tokens is P rows in one step
# (`StepShape.prefill(P)`), which share one read of the weights as a batch
# of P requests would, so its intensity climbs towards the H100's ridge
# (each row's activations, read and written op by op, keep it below).
# Lesson 7 comes back to what that means when prompts and decodes share a
# step.

# %%
for p in (64, 512):
    nbytes, flops = cost_model_counts(StepShape.prefill(p), value_bytes=2)
    print(f"prefill of {p:3d} tokens, fp16: intensity {flops / nbytes:.0f} FLOPs per byte (H100 ridge: {h100_ridge:.0f})")
assert flops / nbytes > 4 * intensity[48][many.index(32)], "a long prompt's step is far denser than a decode step of 32"

# %% [markdown]
# ## What we have
#
# - A step's time is bounded by its bytes over the **memory bandwidth** and
#   its FLOPs over the **peak**; their ratio, the **arithmetic intensity**,
#   against the device's **ridge point** says which bound wins.
# - A decode step reads every weight once for all its requests and does
#   2 FLOPs per weight per request: its intensity grows with the batch, until
#   the KV cache, read per request, levels it off.
# - On an H100 a GPT-2 decode step is memory-bound (and, for so small a
#   model, mostly kernel launches) far past 32 requests: a step of 32 costs
#   about a step of 1 (simulated). On this CPU the ridge is low, the step is
#   compute-bound within a few requests, and a step of 32 costs several steps
#   of 1 (measured).
