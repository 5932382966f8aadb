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
# # Lesson 7: chunked prefill
#
# Under temporal fusion (lesson 4) a newcomer's prompt runs alone, in a step
# of its own, before the newcomer joins the running batch. While that step
# runs, every request already in flight waits for its next token. A prompt
# of a few tokens costs little; a long one stalls everybody. This lesson
# shows the stall, then the remedy of vLLM and Sarathi-Serve, **chunked
# prefill**: cut the prompt into chunks that ride in the decode steps beside
# the running batch. It measures what that trades, time to the first token
# against time between tokens, over a few chunk sizes, and checks that the
# chunks change no logit.

# %% [markdown]
# The helpers of lesson 2: `show(fig, name)` for pictures, and one thread
# per process (the NumPy model runs below).

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

# One thread per process, set before NumPy and Numba load: on a small model and a
# busy machine, parallel kernels spend more time waiting for each other than
# computing, and timings jump. Set these variables yourself to use more threads.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import inspect
from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py

# %% [markdown]
# ## What a user waits for
#
# Two numbers describe a request's wait (lesson 4 met them in its tables):
#
# - **TTFT**, time to first token: from its arrival to its first token. It
#   covers waiting in the queue and the prefill of its prompt.
# - **TPOT**, time per output token: from its first token to its last,
#   divided by the tokens in between, the mean **gap** between two tokens
#   as the user watches them stream in.
#
# A stall shows in the gaps: one long gap among short ones. So we record the
# time of every token of every request, with the engine's `on_token`, a
# function the engine calls with a request's state after each token it
# samples.
#
# ## Time from the cost model of this CPU
#
# Prompts of hundreds of tokens on the GPT-2 124M shape would take this
# lesson minutes to compute for real. So time comes from the simulator of
# lesson 3: the engine runs unchanged on a **model-free backend**
# (`flover.sim.ModelFreeBackend`, which keeps the KV bookkeeping and makes
# each request's tokens a function of its own prompt, with no arithmetic),
# and a `CostClock` advances by what the cost model says each step costs
# on `cpu`: the device file `flover/sim/devices/cpu.json`, whose figures
# were fitted to decode steps and prefills of this model measured on a
# 2-core machine (its description and notes say which, and when). Every
# time in this part is **simulated** and says so.
# %%
from flover.engine import Engine, Request
from flover.runner import PolicyConfig, RunResult
from flover.sim import CostClock, ModelFreeBackend, Plan, load_device, model_shape

plan = Plan(load_device("cpu"), model_shape("gpt2"))
cost, gpt2 = plan.cost(), plan.shape.config
print(plan.label, "-", plan.device.description)


def serve(pc: PolicyConfig, trace: list[Request]) -> tuple[RunResult, dict]:
    """Serve ``trace`` under ``pc`` on the simulated CPU; -> the run and each request's token times."""
    layout = pc.layout(gpt2)
    times = defaultdict(list)  # request id -> the time of each of its tokens
    engine = Engine(ModelFreeBackend(gpt2, layout.shape), pc.scheduler(), layout, CostClock(cost),
                    on_token=lambda state: times[state.request.id].append(engine.clock.now()))  # fmt: skip
    return RunResult(pc, engine.run(trace), engine.stats), times


# %% [markdown]
# ## One long prompt stalls the batch
#
# Six requests with short prompts arrive first and decode; half a second
# later a request with a prompt of 600 tokens arrives. Serve it the way
# lessons 4 and 5 did, each prompt alone (`prefill="alone"`, the default).

# %%
rng = np.random.default_rng(0)
short = [Request(i, 0.05 * i, tuple(rng.integers(0, gpt2.vocab_size, 8).tolist()), 160) for i in range(6)]
long = Request("long", 0.5, tuple(rng.integers(0, gpt2.vocab_size, 600).tolist()), 8)
ALONE = PolicyConfig("fused", slots=8)
alone, alone_times = serve(ALONE, short + [long])


def worst_gap(times: dict, ids) -> float:
    return max(np.diff(times[i]).max() for i in ids)


prefill_s = [s.end_s - s.start_s for s in alone.stats.steps if s.prefill_rows == len(long.prompt_ids)][0]
decode_s = np.median([s.end_s - s.start_s for s in alone.stats.steps if s.prefill_rows == 0])
print(f"the 600-token prefill step: {prefill_s:.2f} s; a decode step of the six: {decode_s * 1e3:.0f} ms (simulated)")
print(f"worst gap between two tokens of a short request: {worst_gap(alone_times, range(6)):.2f} s (simulated)")
assert worst_gap(alone_times, range(6)) >= prefill_s > 10 * decode_s

# %% [markdown]
# Every short request waited the whole prefill for its next token: a gap of
# dozens of decode steps in its stream.
#
# ## Chunks in the decode steps
#
# A step is a list of lanes (lesson 2), and a lane may carry any number of
# a prompt's tokens from any start. So a prompt can be fed a chunk at a
# time, each chunk a lane in a decode step beside the running requests'
# one-token lanes. `PolicyConfig(prefill="chunked", chunk_tokens=N)` makes
# the fused scheduler build its steps this way:

# %%
from flover.engine.scheduler import prefill_chunked

print(inspect.getsource(prefill_chunked))

# %% [markdown]
# Each step holds at most N tokens: every running request's decode first,
# then prompt tokens, oldest request first, in what is left. A chunk short
# of its prompt's end yields logits nobody samples; the last chunk's logits
# give the first token.
#
# So with d requests decoding, a prompt of P tokens takes chunks of N - d
# tokens and a last one of what remains. Work out that plan by hand for our
# long prompt, N = 64 and six requests decoding, and compare it with the
# prompt rows of the engine's steps.

# %%
CHUNK = 64
CHUNKED = PolicyConfig("fused", slots=8, prefill="chunked", chunk_tokens=CHUNK)
chunked, chunked_times = serve(CHUNKED, short + [long])

decoding, p = len(short), len(long.prompt_ids)
plan_by_hand = [CHUNK - decoding] * (p // (CHUNK - decoding)) + ([p % (CHUNK - decoding)] if p % (CHUNK - decoding) else [])
engine_chunks = [s.prefill_rows for s in chunked.stats.steps if s.start_s >= long.arrival_s and s.prefill_rows]
print(f"chunks of the long prompt: by hand {plan_by_hand}\n{'':28s}engine  {engine_chunks}")
assert engine_chunks == plan_by_hand, "six decodes rode in every chunk's step"

# %% [markdown]
# Now the stall is spread out: each of those steps costs more than a
# decode step (it computes up to 58 more rows), but no short request waits
# for the whole prompt. The long request pays instead: its prompt now
# shares its steps with the decodes, and its first token comes later. The
# picture: a dot for each token of each request; the shaded band is the long
# prompt's prefill.

# %%
runs_times = {"alone": alone_times, "chunked": chunked_times}
long_ttft = {name: run_times[long.id][0] - long.arrival_s for name, run_times in runs_times.items()}
gaps = {name: worst_gap(run_times, range(6)) for name, run_times in runs_times.items()}
TITLES = {"alone": "prompt alone", "chunked": f"chunks of {CHUNK}"}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, (name, run_times) in zip(axes, runs_times.items()):
    for row, i in enumerate([*range(6), long.id]):
        ax.plot(run_times[i], [row] * len(run_times[i]), "|", markersize=8, color="#4e79a7" if i != long.id else "#e15759")
    ax.axvspan(long.arrival_s, run_times[long.id][0], color="#f28e2b", alpha=0.25, label="the long prompt's prefill")
    ax.set(xlim=(long.arrival_s - 0.2, long.arrival_s + 1.3 * max(long_ttft.values())),
           xlabel="time (s), simulated on cpu (gpt2)",
           title=f"{TITLES[name]}: worst gap {gaps[name]:.2f} s, long TTFT {long_ttft[name]:.2f} s")  # fmt: skip
axes[0].set_yticks(range(7), [f"short {i}" for i in range(6)] + ["long"])
axes[0].legend(fontsize=8, loc="center")
show(fig, "07_stall.png")
print(f"worst gap: {gaps['alone']:.2f} s alone, {gaps['chunked']:.2f} s chunked; "
      f"the long request's TTFT: {long_ttft['alone']:.2f} s alone, {long_ttft['chunked']:.2f} s chunked (simulated)")  # fmt: skip
assert gaps["chunked"] < gaps["alone"] / 3 and long_ttft["chunked"] > long_ttft["alone"]

# %% [markdown]
# ## The trade-off, over chunk sizes
#
# The chunk size sets the exchange rate. Small chunks keep every decode step
# short (low TPOT) but spread a prompt over many steps, each paying the
# step's fixed costs and waiting behind the decodes (high TTFT); large
# chunks approach prefill alone. Serve one Poisson trace (lesson 4) of
# prompts from 8 to 512 tokens with each policy and compare means over all
# requests. p90 is the **90th percentile**: 90% of the requests did at least
# this well.

# %%
from flover.metrics import summarize
from flover.trace import poisson_trace

trace = poisson_trace(0.5, 24, prompt_len=(8, 512), output_len=(16, 64), seed=1, vocab_size=gpt2.vocab_size)
SIZES = [16, 32, 64, 128, 256, 512]
sweep = {"alone": serve(ALONE, trace)}
sweep |= {n: serve(PolicyConfig("fused", slots=8, prefill="chunked", chunk_tokens=n), trace) for n in SIZES}
table = {}
print(f"{'prefill':>8s} {'TTFT mean':>10s} {'TTFT p90':>9s} {'TPOT mean':>10s} {'TPOT p90':>9s} {'worst gap':>10s}"
      "   (seconds, simulated on cpu)")  # fmt: skip
for name, (run, run_times) in sweep.items():
    m = summarize(run.results, run.stats)
    table[name] = (m["ttft_s"]["mean"], m["ttft_s"]["p90"], m["tpot_s"]["mean"], m["tpot_s"]["p90"],
                   worst_gap(run_times, [r.id for r in trace if r.max_new_tokens > 1]))  # fmt: skip
    print(f"{name!s:>8s} {table[name][0]:10.2f} {table[name][1]:9.2f} {table[name][2]:10.3f} {table[name][3]:9.3f} "
          f"{table[name][4]:10.2f}")  # fmt: skip
assert table[16][0] > 1.2 * table["alone"][0], "small chunks: a later first token"
assert table[16][3] < table["alone"][3] and table[16][4] < table["alone"][4] / 5, "but shorter gaps"

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot([table[n][2] for n in SIZES], [table[n][0] for n in SIZES], marker="o", label="chunked")
for k, n in enumerate(SIZES):
    ax.annotate(f"{n}", (table[n][2], table[n][0]), textcoords="offset points", xytext=(5, 4 if k % 2 else -11), fontsize=8)
ax.plot(table["alone"][2], table["alone"][0], marker="s", color="#e15759", linestyle="none", label="each prompt alone")
ax.set(xlabel="mean TPOT (s)", ylabel="mean TTFT (s)",
       title="chunk size (labels): TTFT against TPOT\nsimulated on cpu (gpt2)")  # fmt: skip
ax.legend(fontsize=8)
show(fig, "07_tradeoff.png")

# %% [markdown]
# ## Why chunks are cheap on a GPU and not here
#
# Lesson 3 showed that a GPU decode step is memory-bound: it reads the
# weights once and has arithmetic to spare. A chunk's rows use that spare
# arithmetic, so on an H100 a decode step can carry hundreds of prompt
# tokens for almost nothing. This CPU is compute-bound from a few rows on:
# every prompt token costs its arithmetic wherever it runs, and chunking
# moves that cost around rather than hiding it. Price a decode step of 16
# requests with and without a chunk (simulated on both devices):

# %%
from flover.sim import CostModel
from reference import Lane

h100 = CostModel(load_device("h100-sxm"), plan.shape)
decodes = [Lane.of([i], [0], 100) for i in range(16)]  # 16 requests at position 100
for name, model in (("cpu", cost), ("h100-sxm", h100)):
    ratios = [model.step_s([*decodes, Lane.of([16], np.zeros(n, np.int64), 0)]) / model.step_s(decodes) for n in SIZES]
    print(f"{name:9s} step with a chunk of", ", ".join(f"{n}: {r:.2f}x" for n, r in zip(SIZES, ratios)), "(simulated)")
with_chunk = {name: model.step_s([*decodes, Lane.of([16], np.zeros(256, np.int64), 0)]) / model.step_s(decodes)
              for name, model in (("cpu", cost), ("h100-sxm", h100))}  # fmt: skip
assert with_chunk["h100-sxm"] < 1.1 < 3 < with_chunk["cpu"]

# %% [markdown]
# ## The chunks change no logit
#
# Back to real arithmetic, on lesson 1's small model. A lane's logits depend
# only on its own tokens and cached K and V, computed in an order fixed by
# its own positions (lesson 8 shows how), never on the other lanes of its
# step or on how its prompt was cut. So chunked prefill must give every
# request the tokens and the logits of serial decoding, bit for bit: its
# first token's logits come from a prompt fed in chunks, beside other
# requests' decodes, where serial decoding fed it whole and alone. Check it
# for a few chunk sizes, small ones cutting every prompt many times.

# %%
from flover.backends import BackendFactory
from flover.clock import VirtualClock
from flover.loading import resolve
from flover.runner import run_policy

config, weights, _ = resolve(None)
make_backend = BackendFactory("numpy", config, weights)
small_trace = poisson_trace(300.0, 12, prompt_len=(20, 120), output_len=(4, 24), seed=4, vocab_size=config.vocab_size)
serial = run_policy(PolicyConfig("serial"), make_backend, small_trace, VirtualClock(0.001, 0.002), keep_logits=True)
truth = {r.id: r for r in serial.results}
for n in (7, 32, 100):
    run = run_policy(PolicyConfig("fused", slots=8, prefill="chunked", chunk_tokens=n), make_backend, small_trace,
                     VirtualClock(0.001, 0.002), keep_logits=True)  # fmt: skip
    mixed = sum(0 < s.prefill_rows < s.rows for s in run.stats.steps)
    for r in run.results:
        assert r.tokens == truth[r.id].tokens, f"chunks of {n}: request {r.id} got other tokens"
        assert all(np.array_equal(a, b) for a, b in zip(r.logits, truth[r.id].logits, strict=True)), (n, r.id)
    print(f"chunks of {n:3d}: {mixed} steps mixed prompt chunks with decodes; tokens and logits equal serial's bitwise")
    assert mixed > 0

# %% [markdown]
# ## What we have
#
# - **TTFT** is the wait for the first token, **TPOT** the mean gap between
#   the next ones. A prompt prefilled alone makes every running request wait
#   for it: one long gap in each of their streams.
# - **Chunked prefill** feeds a prompt in chunks, as lanes beside the decodes
#   of a step of at most N tokens. The gaps shrink with N; the first tokens
#   of long prompts come later. Choose N for the TTFT and TPOT you promise.
# - On a GPU a decode step has arithmetic to spare and carries chunks almost
#   free (simulated); on this CPU the chunk's arithmetic is paid in full.
# - A prompt in chunks gives the logits of the prompt whole, so the tokens
#   are serial decoding's, bit for bit.
