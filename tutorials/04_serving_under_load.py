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
# length, and the server decides what to run at every moment: its
# *policy*. This lesson writes Flover's policy, **temporal fusion**, as an
# engine of about sixty lines, checks that it computes exactly what
# flover's own engine computes, and then serves one workload four ways: one
# request after another, with dynamic batching, with two model instances,
# and fused. All four return the same tokens; they differ in when.

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
RATE, N_REQUESTS = 200.0, 16  # requests per second; a burst that no serial server keeps up with
trace = poisson_trace(RATE, N_REQUESTS, prompt_len=(4, 16), output_len=(16, 48), seed=3, vocab_size=config.vocab_size)
for r in trace[:3]:
    print(f"id {r.id}: arrives at {r.arrival_s * 1e3:6.1f} ms, prompt of {len(r.prompt_ids)}, {r.max_new_tokens} new tokens")
arrivals = np.array([r.arrival_s for r in trace])
assert isinstance(trace[0], Request) and arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)
assert all(4 <= len(r.prompt_ids) <= 16 and 16 <= r.max_new_tokens <= 48 for r in trace)

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
show(fig, "04_arrivals.png")

# %% [markdown]
# ## Clocks
#
# A server needs the time, to know which requests have arrived and to note
# when each one got its tokens. `flover.clock.WallClock()` is real time: a
# run replays the arrivals as they happen, sleeping while nothing has
# arrived. `flover.clock.VirtualClock(step_s, prefill_s)` is a model of
# time with three methods: `now()`; `wait_until(t)`, which jumps to t when
# the server has nothing to do; and `spend(lanes, prefill)`, which a server
# calls after each step, and which moves the time on by `prefill_s` for
# each of the step's `prefill` prompt lanes, plus `step_s` if the step
# decodes at all, *whatever its batch*. Lesson 3 found that this is about
# right on a GPU (an H100, simulated): a decode step costs about the same
# for 1 request as for 32, because its time goes into kernel launches and
# reading the weights, both once per step however many requests share it.
# (On this CPU it is not so; we measure it below.) Under a virtual clock the
# model still computes every token for real; only the timestamps are
# modelled, so a run is deterministic and a picture of it is exact.
#
# ## Temporal fusion, by hand
#
# Flover's idea is to keep one running batch. Each **iteration** of the
# server's loop
#
# 1. moves the requests that have arrived into a waiting queue, first come,
#    first served;
# 2. admits waiting requests while a KV slot (lesson 2) is free;
# 3. prefills each newcomer on its own, a step of one lane, and samples its
#    first token;
# 4. runs **one fused decode step** over every request in flight, one lane
#    each (its last token, at its next position), and samples each one's
#    next token;
# 5. evicts the requests that are done (their length reached, or a stop
#    token sampled): their slots are free for the next newcomers.
#
# So a newcomer joins the batch at the first decode step after its prefill,
# and nobody waits for anyone else to finish. When nothing is in flight the
# loop waits for the next arrival. That is the whole engine:

# %%
from collections import deque
from dataclasses import dataclass, field

from reference import Lane, Sampler


@dataclass(eq=False)
class InFlight:
    """A request in its slot: the tokens it generated, the logits that chose them, when things happened."""

    request: Request
    slot: int
    sampler: Sampler  # lesson 2: its own seeded generator
    cached: int = 0  # positions of its slot that hold its keys and values
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    first_token_s: float = float("nan")
    finish_s: float = float("nan")

    @property
    def done(self) -> bool:
        return len(self.tokens) == self.request.max_new_tokens or self.tokens[-1] in self.request.stop_ids


class FusedEngine:
    """Temporal fusion: admit arrivals into free slots, prefill each alone, one fused decode step, evict."""

    def __init__(self, backend, n_slots: int, clock) -> None:
        self.backend, self.clock = backend, clock
        self.free = list(range(n_slots))  # slots that hold no request
        self.running: list[InFlight] = []
        self.finished: list[InFlight] = []
        self.prefill_steps = self.decode_steps = 0

    def run(self, requests: list[Request]) -> list[InFlight]:
        pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        waiting: deque[Request] = deque()
        while pending or waiting or self.running:
            now = self.clock.now()
            while pending and pending[0].arrival_s <= now:
                waiting.append(pending.popleft())
            newcomers = [self.admit(waiting.popleft()) for _ in range(min(len(waiting), len(self.free)))]
            if not self.running:
                self.clock.wait_until(pending[0].arrival_s)  # nothing to do before the next arrival
                continue
            for state in newcomers:
                self.prefill(state)
            self.fused_decode_step()
        return self.finished

    def admit(self, request: Request) -> InFlight:
        state = InFlight(request, self.free.pop(0), Sampler(request.sampling))
        self.running.append(state)
        return state

    def prefill(self, state: InFlight) -> None:
        lane = Lane.of([state.slot], state.request.prompt_ids, 0)  # the whole prompt, from position 0
        logits = self.backend.step([lane])  # [1, V]
        self.clock.spend([lane], prefill=1)
        self.prefill_steps += 1
        state.cached = len(state.request.prompt_ids)
        self.sample(state, logits[0])

    def fused_decode_step(self) -> None:
        batch = list(self.running)
        if not batch:  # every newcomer finished with its first token
            return
        lanes = [Lane.of([s.slot], [s.tokens[-1]], s.cached) for s in batch]
        logits = self.backend.step(lanes)  # [B, V]
        self.clock.spend(lanes, prefill=0)
        self.decode_steps += 1
        for state, row in zip(batch, logits):
            state.cached += 1
            self.sample(state, row)

    def sample(self, state: InFlight, logits: np.ndarray) -> None:
        now = self.clock.now()
        state.logits.append(logits)
        state.tokens.append(state.sampler(logits))
        if len(state.tokens) == 1:
            state.first_token_s = now
        if state.done:  # evict: the slot is free for the next newcomer
            state.finish_s = now
            self.running.remove(state)
            self.free.append(state.slot)
            self.finished.append(state)


# %% [markdown]
# Serve the trace with 8 slots, so that at its busiest moments newcomers
# wait for a slot, on a virtual clock where a decode step takes 1 ms and a
# prompt's prefill 2 ms.

# %%
from flover.clock import VirtualClock, WallClock
from reference import NumpyBackend

SLOTS, STEP_S, PREFILL_S = 8, 0.001, 0.002
engine = FusedEngine(NumpyBackend(config, weights, SLOTS), SLOTS, VirtualClock(STEP_S, PREFILL_S))
ours = {state.request.id: state for state in engine.run(trace)}
last = max(s.finish_s for s in ours.values())
print(f"{len(ours)} requests, {sum(len(s.tokens) for s in ours.values())} tokens: {engine.prefill_steps} prefill "
      f"steps and {engine.decode_steps} fused decode steps; the last token at {last:.3f} s")  # fmt: skip
assert all(len(ours[r.id].tokens) == r.max_new_tokens for r in trace), "no stop ids here: every request ran to its length"

# %% [markdown]
# ## The same engine as flover's
#
# flover's engine is `flover.engine.Engine`, and its fused policy runs it
# with a `FusedScheduler` and a **KV layout**, the part that decides where
# each request's keys and values live: Flover's is `SlotLayout`, one slot
# per request (lesson 5 opens it).
# `flover.runner.PolicyConfig("fused", slots=8)` names that policy, and
# `flover.runner.run_policy(policy_config, make_backend, requests, clock)`
# builds the engine and serves a trace with it.
# `make_backend(kv)` must return a fresh backend with that much KV memory
# (an int is that many slots); `flover.backends.BackendFactory(name,
# config, weights)` is one. With `keep_logits=True` each request keeps the
# logits it sampled from. Serve the same trace on the same clock and compare
# request by request: the tokens, the two timestamps, every logit bit for
# bit, and the number of prefill and decode steps.

# %%
from flover.backends import BackendFactory
from flover.runner import PolicyConfig, run_policy

make_backend = BackendFactory("numpy", config, weights)  # make_backend(8): a NumpyBackend with 8 slots
flover_fused = run_policy(PolicyConfig("fused", slots=SLOTS), make_backend, trace, clock=VirtualClock(STEP_S, PREFILL_S),
                          keep_logits=True)  # fmt: skip
for theirs in flover_fused.results:
    mine = ours[theirs.id]
    assert mine.tokens == theirs.tokens, f"request {theirs.id}: other tokens"
    assert (mine.first_token_s, mine.finish_s) == (theirs.first_token_s, theirs.finish_s), f"request {theirs.id}: other times"
    assert len(mine.logits) == len(theirs.logits) and all(map(np.array_equal, mine.logits, theirs.logits))
prefills = [s.prefill_rows > 0 for s in flover_fused.stats.steps]
flover_steps = (sum(prefills), len(prefills) - sum(prefills))
print(f"flover's engine: {flover_steps[0]} prefill steps, {flover_steps[1]} decode steps; the same tokens, times and logits")
assert (engine.prefill_steps, engine.decode_steps) == flover_steps

# %% [markdown]
# It is the same loop. Here is flover's: `run` is our `run`, and
# `iterate` one iteration of it. The scheduler's `admit` is our admission
# (it asks the KV layout for room, here a free slot), and its `steps` are
# Flover's `prefill_alone`: each newcomer's prompt alone, then one fused
# decode step. `_step` runs one step: lanes, `backend.step`, the clock, and
# for each request `accept` (sample and timestamps) and, once done,
# `release` (evict). What ours lacks: `idle_lanes` and `_compact`, lesson
# 5's subject (rows a step computes for no one, and moving requests between
# slots); `_grow` and `_preempt`, for memory cut into pages, which can run
# out as requests grow (lesson 6); and cancelled requests, for a live
# server.

# %%
import inspect

from flover.engine import Engine
from flover.engine.scheduler import prefill_alone

for part in (Engine.run, Engine.iterate, prefill_alone, Engine._step):
    print(inspect.getsource(part))

# %% [markdown]
# ## Iteration-level scheduling, continuous batching
#
# The field has two names for this loop. Orca (Yu et al., OSDI 2022) called
# it **iteration-level scheduling**: the scheduler decides afresh at every
# iteration, one decode step, which requests run, instead of running a
# batch to its end. vLLM (Kwon et al., SOSP 2023) and most servers since
# call it **continuous batching**. Flover's temporal fusion is the same
# idea. Where they differ is the KV memory. Flover gives each request a
# fixed slot that holds a whole context, and its fused step runs over a
# contiguous batch of slots, kept contiguous by the *memory shuffle*, which
# moves requests between slots to close the gaps that departed ones leave
# (lesson 5). vLLM cuts the memory into small pages, blocks of 16 positions
# that a request takes as it grows and that may lie anywhere (lesson 6
# compares the two).
#
# ## Four policies
#
# Every policy runs on the same kind of backend (lesson 2) and, but for
# instances, on the same engine loop; what differs is the **scheduler**,
# which decides which requests are admitted when and which share a step.
#
# - **serial**: first come, first served, one request at a time from prefill
#   to its last token. This is `reference.generate` applied to each request
#   in turn, the ground truth.
# - **dynamic** batching, as in the dynamic batcher of NVIDIA's Triton
#   Inference Server: the first waiting request opens a batch; the batch
#   closes `queue_delay_s` seconds after it opened or when it holds
#   `max_batch` requests, and then runs until its *longest* member is done.
#   Members that finish early stay in the batch as padding, and requests
#   arriving meanwhile wait for the next batch.
# - **instances**: `instances` copies of the model serve concurrently, each
#   serially; requests wait in one queue, first come first served, and the
#   first copy free takes the next, as Triton's default scheduler hands
#   requests to a model's instances. (On the virtual clock each copy runs
#   on a clock of its own; on the wall clock each is a process of its own,
#   with its own weights and its share of the cores.)
# - **fused**: temporal fusion, the engine above, which we already ran.
#
# Dynamic batching gets the same KV memory as fusion, 8 slots.

# %%
POLICIES = [
    PolicyConfig("serial"),
    PolicyConfig("dynamic", max_batch=SLOTS, queue_delay_s=0.01),
    PolicyConfig("instances", instances=2),
    PolicyConfig("fused", slots=SLOTS),
]
virtual = {pc.policy: run_policy(pc, make_backend, trace, clock=VirtualClock(STEP_S, PREFILL_S)) for pc in POLICIES[:-1]}
virtual["fused"] = flover_fused

# %% [markdown]
# ## Every policy returns the same tokens
#
# `run_policy` returns a `RunResult`: its `results`, one `RequestResult` per
# request (its `tokens` and four timestamps: `arrival_s`, `admitted_s` when
# it got its KV memory, its prefill next, `first_token_s` and `finish_s`),
# its `stats` and its `metrics` (below). A policy decides *when*, never
# *what*: each request's tokens are exactly those `reference.generate` makes
# for it alone.

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
# - **latency**: last token minus arrival. Besides its mean, the table
#   gives its **p90**, the 90th percentile: the latency that 9 requests in
#   10 stay within. A mean hides the unlucky few; a percentile shows them.
# - **TPOT**, time per output token after the first.
# - **makespan**: from the first arrival to the last finish, and
#   **throughput**: tokens generated per second of makespan.
#
# `run.stats.steps` lists every step the engine ran, prefills and decode
# steps alike, as a `Step(start_s, end_s, batch, rows, idle_rows,
# prefill_rows, kv_bytes)`: `batch` requests were computed, in `rows` rows
# of which `prefill_rows` were prompt tokens and `idle_rows` rows were for
# no request at all (the padding of dynamic batching here; lesson 5 meets
# more); `kv_bytes` is the KV memory requests held. The metrics count the
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
# `flover.plots.timeline(run, path, note)` draws one bar per request (grey
# while it waits, orange during its prefill, blue while it decodes) above
# the number of requests in every decode step, and saves it as a picture.
# Serial decoding makes everyone queue; dynamic batching lets a batch form,
# then makes later arrivals wait for the whole batch and carries finished
# members (the red "lanes computed, idle ones too" line above the blue
# one); fusion lets each request join the running batch right after its
# prefill, and at its busiest the batch fills all 8 slots, so newcomers
# wait for one to free.

# %%
from flover.plots import latency_cdfs, timeline

SIMULATED = "virtual clock: simulated time"
for policy in ("serial", "dynamic", "fused"):  # instances: two serial queues side by side
    show_file(timeline(virtual[policy], OUT / f"04_timeline_virtual_{policy}.png", SIMULATED))
assert max(step.batch for step in virtual["fused"].stats.steps) == SLOTS, "at its busiest the batch fills every slot"

# %% [markdown]
# `flover.plots.latency_cdfs(runs, path, note)` draws, per policy, the
# fraction of requests served within a given latency (left) and time to
# first token (right): the further left and the steeper, the better.

# %%
show_file(latency_cdfs(list(virtual.values()), OUT / "04_latency_virtual.png", SIMULATED))

# %% [markdown]
# ## Why fusion wins: count the steps
#
# Under this clock a decode step costs the same whatever its batch, so what
# matters is the number of steps a request waits through. Serial decoding
# runs one step per generated token after the first, and a request waits
# for everyone who came before it. The two instances halve that queue. A
# dynamic batch shares steps, but its members wait for the batch to close
# and the latecomers wait for the batch's longest member. Fusion shares
# every step among everyone in flight: its steps are bounded by how long
# the requests overlap, not by their sum.

# %%
steps = {policy: run.metrics["decode_steps"] for policy, run in virtual.items()}
print("decode steps:", steps, " sum of output lengths - requests:", sum(r.max_new_tokens - 1 for r in trace))
assert steps["serial"] == sum(len(t) - 1 for t in truth.values())
assert steps["fused"] < steps["dynamic"] < steps["serial"]

# %% [markdown]
# ## On the wall clock
#
# The virtual clock assumed a step costs the same at any batch size. On
# this CPU a bigger batch costs more (lesson 3 measured the gpt2 shape), so
# measure it for this lesson's model: the time of one decode step for B
# requests, and of a prefill of a prompt of the trace's mean length. Other
# programs share the machine, so each call runs many times, the calls
# taking turns so that a busy moment slows them all alike, and each keeps
# its fastest time.

# %%
import time


def fastest_ms(calls: dict, repeats: int = 15) -> dict:
    """The fastest of ``repeats`` runs of each call, in ms; the calls take turns."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
    return best


def decode_call(backend, batch: int, position: int = 40):
    slots, tokens, positions = np.arange(batch), np.zeros(batch, np.int64), np.full(batch, position)
    return lambda: backend.decode(slots, tokens, positions)


probe = make_backend(SLOTS)
batches = [1, 2, 4, SLOTS]
prompt = np.arange(round(np.mean([len(r.prompt_ids) for r in trace]))) % probe.config.vocab_size
timed = fastest_ms({b: decode_call(probe, b) for b in batches} | {"prefill": lambda: probe.prefill(0, prompt)})
ms = [timed[b] for b in batches]
for b, t in zip(batches, ms):
    print(f"batch {b:2d}: {t:.3f} ms per step, {t / b:.3f} ms per token")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(batches, ms, marker="o", label="ms per step")
ax.plot(batches, [t / b for t, b in zip(ms, batches)], marker="o", label="ms per token")
ax.set(xlabel="requests in the decode step", ylabel="ms", xscale="log", title="cost of one decode step (this CPU, measured)")
ax.legend()
show(fig, "04_step_cost.png")
assert ms[-1] > 1.3 * ms[0], f"on this CPU a step of {SLOTS} costs clearly more than a step of 1"

# %% [markdown]
# A step grows with its batch, but a token still costs much less inside a
# batch. Lesson 3's ceiling of fusion, `B x step(1) / step(B)`, counted
# decode steps alone: serial decoding pays a whole batch-1 step per token, a
# fused batch of 8 an eighth of its step. But every policy also pays for
# each prompt's prefill, which fusion cannot share, so spread one prefill
# over the tokens its request generates and compare:
#
#     ceiling = (step(1) + prefill / n_out) / (step(8) / 8 + prefill / n_out)
#
# On the GPU of lesson 3, where step(8) is close to step(1), the ceiling
# comes near 8 for long outputs. `benchmarks/fusion_ceiling.py` measures it
# for the gpt2 shape on a CPU (7.5x at 32 slots on 2 cores, in
# `benchmarks/RESULTS.md`).

# %%
n_out = float(np.mean([r.max_new_tokens for r in trace]))
prefill_ms = timed["prefill"]
per_token = prefill_ms / n_out
ceiling = (ms[0] + per_token) / (ms[-1] / SLOTS + per_token)
print(f"prefill of {len(prompt)} tokens: {prefill_ms:.3f} ms, over {n_out:.1f} generated tokens each")
print(f"ceiling at {SLOTS} slots: {ms[0] / (ms[-1] / SLOTS):.1f}x decode only, {ceiling:.1f}x with prefill")
assert ceiling > 1.5, "even paying for every prefill, a fused batch has room to serve tokens faster"

# %% [markdown]
# So fusion should still beat serial decoding on the wall clock. Serve the
# same trace for real: `WallClock` replays the arrivals in real time (a run
# takes at least as long as the trace) and every timestamp is measured. The
# numbers move from run to run, and on a busy machine (every step slower,
# and unevenly so) the ranking of dynamic batching and instances against
# fusion can change too; the virtual clock above is the controlled
# experiment, this is the field test. The trace lasts a fraction of a
# second, so each policy serves it three times, the policies taking turns,
# and keeps its run with the shortest makespan.

# %%
wall = {}
for _ in range(3):
    for pc in POLICIES:
        if pc.policy != "instances":  # below: they run in processes of their own
            run = run_policy(pc, make_backend, trace, clock=WallClock())
            assert {r.id: r.tokens for r in run.results} == truth
            if pc.policy not in wall or run.metrics["makespan_s"] < wall[pc.policy].metrics["makespan_s"]:
                wall[pc.policy] = run

# %% [markdown]
# On the wall clock the instances are real: `run_policy` starts one process
# per instance, each with its own weights and its share of the cores, and
# hands the next waiting request to whichever process finishes first.
# Python starts such a process by running the parent's main
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

with open(OUT / "04_trace.jsonl", "w") as out:
    write_trace(trace, out)
bench = subprocess.run([sys.executable, "-m", "flover.cli", "bench", "--trace", str(OUT / "04_trace.jsonl"),
                        "--policy", "instances", "--instances", "2", "--quiet", "--json", str(OUT / "04_instances.json")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
assert bench.returncode == 0, bench.stderr[-3000:]
record = json.loads((OUT / "04_instances.json").read_text())
nan = float("nan")  # the file keeps no admission times
served = [RequestResult(r["id"], r["arrival_s"], nan, r["first_token_s"], r["finish_s"], r["tokens"]) for r in record["requests"]]
assert {r.id: r.tokens for r in served} == truth
wall["instances"] = RunResult(PolicyConfig("instances", instances=2), served, metrics=record["metrics"])
wall = {pc.policy: wall[pc.policy] for pc in POLICIES}  # in the order of the table above
table(wall)
show_file(timeline(wall["fused"], OUT / "04_timeline_wall_fused.png", "wall clock: measured on this CPU"))
show_file(latency_cdfs(list(wall.values()), OUT / "04_latency_wall.png", "wall clock, measured"))
wall_latency = {policy: run.metrics["latency_s"]["mean"] for policy, run in wall.items()}
assert wall_latency["fused"] < wall_latency["serial"]
assert wall["fused"].metrics["makespan_s"] < wall["serial"].metrics["makespan_s"]

# %% [markdown]
# One thing to look for in the fused timeline: before each fused step the
# engine prefills the requests that had arrived when the iteration began
# (newcomers that arrive during those prefills wait for the next iteration,
# so a stream of arrivals cannot starve the running batch). Each prefill
# still pauses the batch for its own length (the orange bars). Flover
# avoids even those pauses on a GPU by running prefills on
# a second **GPU stream**, a separate queue of work on the GPU that runs
# alongside the first, so the batch keeps decoding meanwhile.
#
# Another answer is **chunked prefill**: a prompt cut into chunks that ride
# in the decode steps beside the running batch. Lesson 7 builds it.

# %% [markdown]
# ## What we have
#
# - A **policy** decides which requests share a decode step and when each
#   may start; it never changes the tokens.
# - **Temporal fusion** keeps one running batch that requests join right
#   after their own prefill and leave as soon as they finish, so the cost of
#   a step is shared by everyone in flight and nobody waits for a batch. We
#   wrote it as a loop of about sixty lines (admit, prefill, one fused step,
#   sample, evict), and it returned exactly what `flover.engine.Engine`
#   returns: tokens, times, logits bit for bit, and steps. The field calls
#   it iteration-level scheduling (Orca) or continuous batching (vLLM).
# - When a request in the middle of the fused batch leaves, its slot becomes
#   a gap in the batch. Lesson 5 is about what that gap costs and how
#   Flover closes it.
