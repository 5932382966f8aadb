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
# # Lesson 4: serving under load
#
# An inference server does not get one request at a time. Requests arrive
# when their users send them, each with its own prompt and its own output
# length, and the server decides what to run at every moment: a *policy*.
# This lesson builds one workload of requests arriving at random times and
# serves it four ways: one after another, with dynamic batching, with two
# model instances, and with **temporal fusion**. All four return the same
# tokens; they differ in when.

# %% [markdown]
# The helpers of lesson 2: `OUT` and `show(fig, name)` for pictures (and
# `show_file(path)` for a picture already saved), and one thread per process
# so that wall-clock timings stay steady.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

# One thread per process, set before NumPy and Numba load: on a small model and a
# busy machine, parallel kernels spend more time waiting for each other than
# computing, and timings jump. Set these variables yourself to use more threads.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


import matplotlib.pyplot as plt
import numpy as np
from _display import OUT, show, show_file  # tutorials/_display.py

# %% [markdown]
# ## Requests and Poisson arrivals
#
# A request is a `flover.engine.Request`: an `id`, its `arrival_s` (seconds
# from the start of the run), its `prompt_ids`, its `max_new_tokens`, its
# `sampling` (lesson 2's `SamplingParams`; greedy by default) and its
# `stop_ids`.
#
# `flover.trace.poisson_trace(rate, n, prompt_len, output_len, seed)` makes n
# requests arriving as a **Poisson process** of `rate` requests per second,
# the workload of the Flover paper: the gaps between arrivals are independent
# and exponentially distributed with mean 1 / rate, so requests come in
# clumps and lulls rather than evenly. Prompt and output lengths are drawn
# uniformly from inclusive ranges, prompt tokens at random (their meaning
# does not matter for scheduling), and request i gets seed i.
# %%
from flover.engine import Request
from flover.loading import resolve
from flover.trace import poisson_trace

config, weights, tokenizer = resolve(None)
RATE, N_REQUESTS = 200.0, 24  # requests per second; a burst that no serial server keeps up with
trace = poisson_trace(RATE, N_REQUESTS, prompt_len=(4, 16), output_len=(24, 72), seed=3, vocab_size=config.vocab_size)
for r in trace[:3]:
    print(f"id {r.id}: arrives at {r.arrival_s * 1e3:6.1f} ms, prompt of {len(r.prompt_ids)}, {r.max_new_tokens} new tokens")
arrivals = np.array([r.arrival_s for r in trace])
assert isinstance(trace[0], Request) and arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)
assert all(4 <= len(r.prompt_ids) <= 16 and 24 <= r.max_new_tokens <= 72 for r in trace)

# %% [markdown]
# A longer trace shows the distribution: gaps follow the exponential curve,
# and arrivals bunch up.

# %%
many = poisson_trace(RATE, 4000, (1, 1), (1, 1), seed=0)
gaps = np.diff([r.arrival_s for r in many])
assert abs(gaps.mean() * RATE - 1) < 0.05, "mean gap is 1 / rate"
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3))
left.hist(gaps * 1e3, bins=60, density=True, alpha=0.6, label="gaps in a trace")
grid = np.linspace(0, gaps.max(), 200)
left.plot(grid * 1e3, RATE * np.exp(-RATE * grid) / 1e3, label="exponential, mean 1/rate")
left.set(xlabel="gap between arrivals (ms)", ylabel="density", title=f"Poisson arrivals at {RATE:g}/s")
left.legend()
right.eventplot(arrivals * 1e3, lineoffsets=0, linelengths=1)
right.set(xlabel="arrival time (ms)", yticks=[], title=f"the {N_REQUESTS} requests we serve")
show(fig, "03_arrivals.png")

# %% [markdown]
# ## Four policies
#
# Every policy runs on the same kind of backend (lesson 2) and, but for
# instances, on the same engine loop, `flover.engine.Engine`. Each iteration
# it admits waiting requests into KV memory, runs steps of lanes (a
# newcomer's prompt, one decode token for each request in flight), samples,
# and lets finished requests go. What differs is the **scheduler**, which
# decides which requests are admitted when and which share a step.
#
# - **serial**: first come, first served, one request at a time from prefill
#   to its last token. This is `reference.generate` applied to each request
#   in turn, the ground truth.
# - **dynamic** batching (Triton's dynamic batcher): the first waiting
#   request opens a batch; the batch closes `queue_delay_s` seconds after it
#   opened or when it holds `max_batch` requests, and then runs until its *longest* member
#   is done. Members that finish early stay in the batch as padding, and
#   requests arriving meanwhile wait for the next batch.
# - **instances**: `instances` copies of the model serve concurrently, each
#   serially; a request goes to the copy with the fewest outstanding
#   requests. (On the virtual clock below the copies are simulated one
#   after another; on the wall clock each is a process of its own, with its
#   own weights and its share of the cores.)
# - **fused** (temporal fusion, Flover): a single running batch over `slots`
#   KV slots. A newcomer is prefilled on its own into a free slot and joins
#   the batch at the very next step; every step runs *one* fused decode step
#   over every request in flight; a request leaves as soon as it is done.
#
# `flover.runner.PolicyConfig` names a policy and its settings, and
# `flover.runner.run_policy(policy_config, make_backend, requests, clock)`
# builds the policy's scheduler (`FusedScheduler`, `SerialScheduler`,
# `DynamicScheduler`) and KV layout and serves a trace under it.
# `make_backend(kv)` must return a fresh backend with that much KV memory
# (an int is that many slots); each policy asks for what it needs. The
# instance processes build their own backends, so `make_backend` must
# travel to them: `flover.backends.BackendFactory(name, config, weights)`
# is a `make_backend` that can.
#
# ## Clocks
#
# Time comes from a clock. `flover.clock.WallClock()` is real time: the run
# replays the arrivals as they happen, sleeping while nothing has arrived.
# `flover.clock.VirtualClock(step_s, prefill_s)` is a model of time: it moves
# only when the server waits for an arrival, or by `prefill_s` per prompt
# (or chunk of one) in a step and `step_s` per step that decodes, *whatever
# the batch size*. That is the
# idealised cost of decoding a big model, where a step is bound by reading
# the weights once, however many requests share the read. Under a virtual
# clock the model still computes every token for real; only the timestamps
# are modelled, so the run is deterministic and a picture of it is exact.

# %%
from flover.backends import BackendFactory
from flover.clock import VirtualClock, WallClock
from flover.runner import PolicyConfig, run_policy

make_backend = BackendFactory("numpy", config, weights)  # make_backend(16): a NumpyBackend with 16 slots
POLICIES = [
    PolicyConfig("serial"),
    PolicyConfig("dynamic", max_batch=8, queue_delay_s=0.01),
    PolicyConfig("instances", instances=2),
    PolicyConfig("fused", slots=16),
]
STEP_S, PREFILL_S = 0.001, 0.002
virtual = {pc.policy: run_policy(pc, make_backend, trace, clock=VirtualClock(STEP_S, PREFILL_S)) for pc in POLICIES}

# %% [markdown]
# ## Every policy returns the same tokens
#
# `run_policy` returns a `RunResult`: its `results`, one `RequestResult` per
# request (its `tokens` and four timestamps: `arrival_s`, `admitted_s` when
# it got its KV memory, its prefill next, `first_token_s` and `finish_s`), its `stats` and its
# `metrics` (below). A policy decides *when*, never *what*: each request's
# tokens are exactly those `reference.generate` makes for it alone.

# %%
from reference import generate

alone_backend = make_backend(1)
truth = {r.id: list(generate(alone_backend, r.prompt_ids, r.max_new_tokens, r.sampling, r.stop_ids)) for r in trace}
for policy, run in virtual.items():
    assert {r.id: r.tokens for r in run.results} == truth, f"{policy} changed some tokens"
    assert all(r.arrival_s <= r.admitted_s <= r.first_token_s <= r.finish_s for r in run.results)
print("all four policies returned, for every request, the tokens of reference.generate")

# %% [markdown]
# ## What the user sees
#
# The serving metrics (`run.metrics`, from `flover.metrics.summarize`):
#
# - **TTFT**, time to first token: first token minus arrival (waiting plus
#   prefill); what makes a chat feel responsive.
# - **latency**: last token minus arrival.
# - **TPOT**, time per output token after the first.
# - **makespan**: from the first arrival to the last finish, and
#   **throughput**: tokens generated per second of makespan.
#
# `run.stats.steps` lists every step the engine ran, prefills and decode
# steps alike, as a `Step(start_s, end_s, batch, rows, idle_rows,
# prefill_rows, kv_bytes)`: `batch` requests were computed, in `rows` rows
# of which `prefill_rows` were prompt tokens and `idle_rows` rows were for
# no request at all (the padding of dynamic batching here, holes in lesson
# 4); `kv_bytes` is the KV memory requests held. The metrics count the
# `decode_steps` and their `mean_batch`, the decode rows of a decode step.
# `run.config` is the run's `PolicyConfig`, whose `label` names it in
# tables and plots.


# %%
def table(runs: dict) -> None:
    print(f"{'policy':34s} {'makespan':>9s} {'mean lat':>9s} {'p90 lat':>9s} {'mean TTFT':>9s} {'steps':>6s} {'batch':>6s}")
    for run in runs.values():
        m = run.metrics
        print(
            f"{run.config.label:34s} {m['makespan_s']:9.3f} {m['latency_s']['mean']:9.3f} {m['latency_s']['p90']:9.3f} "
            f"{m['ttft_s']['mean']:9.3f} {m['decode_steps']:6d} {m['mean_batch']:6.2f}"
        )


table(virtual)
latency = {policy: run.metrics["latency_s"]["mean"] for policy, run in virtual.items()}
assert latency["fused"] == min(latency.values()), "fusion gives the lowest mean latency"
assert virtual["fused"].metrics["makespan_s"] == min(run.metrics["makespan_s"] for run in virtual.values())

# %% [markdown]
# ## The timeline
#
# `flover.plots.timeline(run, path)` draws one bar per request (grey while it
# waits, orange during its prefill, blue while it decodes) above the number
# of requests in every step (a prefill step holds one), and saves it as a
# picture. Serial decoding makes everyone queue; dynamic batching lets a
# batch form, then makes later arrivals wait for the whole batch and carries
# finished members (the red "lanes computed, idle ones too" line above the
# blue one); fusion lets each request join the running batch one step after
# its prefill.

# %%
from flover.plots import latency_cdfs, timeline

for policy, run in virtual.items():
    show_file(timeline(run, OUT / f"03_timeline_virtual_{policy}.png"))

# %% [markdown]
# `flover.plots.latency_cdfs(runs, path)` draws, per policy, the fraction of
# requests served within a given latency (left) and time to first token
# (right): the further left and the steeper, the better.

# %%
show_file(latency_cdfs(list(virtual.values()), OUT / "03_latency_virtual.png"))

# %% [markdown]
# ## Why fusion wins: count the steps
#
# Under this clock a decode step costs the same whatever its batch, so what
# matters is the number of steps a request waits through. Serial decoding
# runs one step per generated token, about `sum(max_new_tokens)` in all, and
# a request waits for everyone who came before it. The two instances halve
# that queue. A dynamic batch shares steps, but its members wait for the
# batch to close and the latecomers wait for the batch's longest member. Fusion
# shares every step among everyone in flight: its steps are bounded by how
# long the requests overlap, not by their sum.

# %%
steps = {policy: run.metrics["decode_steps"] for policy, run in virtual.items()}
print("decode steps:", steps, " sum of output lengths - requests:", sum(r.max_new_tokens - 1 for r in trace))
assert steps["serial"] == sum(len(t) - 1 for t in truth.values())
assert steps["fused"] < steps["dynamic"] < steps["serial"]

# %% [markdown]
# ## On the wall clock
#
# The virtual clock assumed a step costs the same at any batch size. On a
# real machine a bigger batch costs somewhat more, so measure it: the time of
# one decode step for B requests, fastest of a few tries.

# %%
import time


def step_ms(backend, batch: int, position: int = 40, repeats: int = 7) -> float:
    slots, tokens, positions = np.arange(batch), np.zeros(batch, np.int64), np.full(batch, position)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        backend.decode(slots, tokens, positions)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


probe = make_backend(16)
batches = [1, 2, 4, 8, 16]
ms = [step_ms(probe, b) for b in batches]
for b, t in zip(batches, ms):
    print(f"batch {b:2d}: {t:.3f} ms per step, {t / b:.3f} ms per token")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(batches, ms, marker="o", label="ms per step")
ax.plot(batches, [t / b for t, b in zip(ms, batches)], marker="o", label="ms per token")
ax.set(xlabel="requests in the decode step", ylabel="ms", xscale="log", title="cost of one decode step")
ax.legend()
show(fig, "03_step_cost.png")
assert ms[-1] / 16 < ms[0] / 2, "a token costs far less in a batch of 16 than alone"

# %% [markdown]
# These few numbers bound what any policy can gain. Serial decoding pays a
# whole batch-1 step per token; a fused batch of 16 pays a sixteenth of its
# step. Both pay for every prompt's prefill, which fusion cannot share, so
# spread one prefill over the tokens its request generates and compare:
#
#     ceiling = (step(1) + prefill / n_out) / (step(16) / 16 + prefill / n_out)
#
# On a GPU a decode step is bound by reading the weights, so a step of 16
# costs little more than a step of 1 and the ceiling comes near 16. On a CPU
# the step soon becomes bound by arithmetic and grows with the batch, and the
# ceiling is lower. `benchmarks/fusion_ceiling.py` measures it for the gpt2
# shape (7.5x at 32 slots on a 2-core CPU, in `benchmarks/RESULTS.md`).

# %%
prompt = np.arange(round(np.mean([len(r.prompt_ids) for r in trace]))) % probe.config.vocab_size
n_out = float(np.mean([r.max_new_tokens for r in trace]))
prefill_ms = float("inf")
for _ in range(7):
    start = time.perf_counter()
    probe.prefill(0, prompt)
    prefill_ms = min(prefill_ms, 1e3 * (time.perf_counter() - start))
per_token = prefill_ms / n_out
ceiling = (ms[0] + per_token) / (ms[-1] / 16 + per_token)
print(f"prefill of {len(prompt)} tokens: {prefill_ms:.3f} ms, over {n_out:.1f} generated tokens each")
print(f"ceiling at 16 slots: {ms[0] / (ms[-1] / 16):.1f}x decode only, {ceiling:.1f}x with prefill")
assert 1 < ceiling < ms[0] / (ms[-1] / 16), "prefill, paid alike by every policy, lowers the ceiling"

# %% [markdown]
# A token costs much less inside a batch, so fusion should still beat serial
# decoding on the wall clock. Serve the same trace for real: `WallClock`
# replays the arrivals in real time (a run takes at least as long as the
# trace) and every timestamp is measured. The numbers move from run to run,
# and on a busy machine (every step slower, and unevenly so) the ranking of
# dynamic batching and instances against fusion can change too; the virtual
# clock above is the controlled experiment, this is the field test.

# %%
wall = {}
for pc in POLICIES:
    if pc.policy != "instances":  # below: they run in processes of their own
        wall[pc.policy] = run_policy(pc, make_backend, trace, clock=WallClock())
        assert {r.id: r.tokens for r in wall[pc.policy].results} == truth

# %% [markdown]
# On the wall clock the instances are real: `run_policy` starts one process
# per instance, each with its own weights and its share of the cores, and
# routes each request, as it arrives, to the one with the fewest outstanding
# requests. Python starts such a process by running the parent's main
# script again in it (the *spawn* start method), so a script that starts
# processes keeps its top level under `if __name__ == "__main__":`. A
# lesson cannot, so we serve the instances with the `flover bench` command
# (lesson 10 says more about it), which is `run_policy` behind such a guard:
# we write our trace as JSON Lines (`flover.trace.write_trace`), and read
# back each request's tokens and timestamps, and the metrics, from its
# `--json` file.

# %%
import json
import subprocess
import sys

from flover.engine import RequestResult
from flover.runner import RunResult
from flover.trace import write_trace

with open(OUT / "03_trace.jsonl", "w") as out:
    write_trace(trace, out)
bench = subprocess.run([sys.executable, "-m", "flover.cli", "bench", "--trace", str(OUT / "03_trace.jsonl"),
                        "--policy", "instances", "--instances", "2", "--quiet", "--json", str(OUT / "03_instances.json")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
assert bench.returncode == 0, bench.stderr[-3000:]
record = json.loads((OUT / "03_instances.json").read_text())
nan = float("nan")  # the file keeps no admission times
served = [RequestResult(r["id"], r["arrival_s"], nan, r["first_token_s"], r["finish_s"], r["tokens"]) for r in record["requests"]]
assert {r.id: r.tokens for r in served} == truth
wall["instances"] = RunResult(PolicyConfig("instances", instances=2), served, metrics=record["metrics"])
wall = {pc.policy: wall[pc.policy] for pc in POLICIES}  # in the order of the table above
table(wall)
show_file(timeline(wall["fused"], OUT / "03_timeline_wall_fused.png"))
show_file(latency_cdfs(list(wall.values()), OUT / "03_latency_wall.png"))
wall_latency = {policy: run.metrics["latency_s"]["mean"] for policy, run in wall.items()}
assert wall_latency["fused"] < wall_latency["serial"]
assert wall["fused"].metrics["makespan_s"] < wall["serial"].metrics["makespan_s"]

# %% [markdown]
# One thing to look for in the fused timeline: before each fused step the
# engine prefills the requests that had arrived when the iteration began
# (newcomers that arrive during those prefills wait for the next iteration,
# so a stream of arrivals cannot starve the running batch). Each prefill
# still pauses the batch for its own length: the small gaps in the batch-size
# curve. Flover avoids even those by running prefills on a separate GPU
# stream while the batch keeps decoding.
#
# Another answer, vLLM's and Sarathi-Serve's, is **chunked prefill**: since
# a step is just a list of lanes (lesson 2), a prompt can be cut into chunks
# that ride in the decode steps beside the running batch.
# `PolicyConfig("fused", prefill="chunked", chunk_tokens=n)` puts every
# decode and then as many prompt tokens as fit in steps of at most n
# tokens, so the batch stops for a prompt only when nothing else runs. The
# tokens, once again, are the same.

# %%
chunked = run_policy(PolicyConfig("fused", slots=16, prefill="chunked", chunk_tokens=32), make_backend, trace,
                     clock=VirtualClock(STEP_S, PREFILL_S))  # fmt: skip
assert {r.id: r.tokens for r in chunked.results} == truth
prefill_only = {name: sum(s.prefill_rows == s.rows for s in run.stats.steps)
                for name, run in (("alone", virtual["fused"]), ("chunked", chunked))}  # fmt: skip
print(f"steps that hold only prompt tokens, the batch waiting: {prefill_only}")
assert prefill_only["chunked"] < prefill_only["alone"] == len(trace)

# %% [markdown]
# ## What we have
#
# - A **policy** decides which requests share a decode step and when each
#   may start; it never changes the tokens.
# - **Temporal fusion** keeps one running batch that requests join one step
#   after their own prefill and leave as soon as they finish, so the cost of
#   a step is shared by everyone in flight and nobody waits for a batch.
# - When a request in the middle of the fused batch leaves, its slot becomes
#   a hole. Lesson 5 is about what to do with it.
