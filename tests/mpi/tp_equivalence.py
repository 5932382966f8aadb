"""Run under ``mpiexec -n N python -m mpi4py tests/mpi/tp_equivalence.py --seed S``.

Every rank builds the same models; rank 0 drives the tensor-parallel backend
and checks, on random requests, against the single-process NumpyBackend:

- greedy tokens equal, except where two top logits lie within rounding (a split),
- TP logits within 1e-5 (relative to the largest logit) of single-process logits,
- TP fused decoding (requests joining, leaving and being shuffled between slots
  of one running batch) bitwise equal to TP serial decoding;
- on paged KV (blocks of 8 at random places), prompts prefilled in random
  chunks, several prompts' chunks in one step, bitwise equal to each prompt
  prefilled whole: ragged STEP commands with multi-block tables on every rank.

Rank 0 prints one JSON line per model; a failed check raises, which aborts the job.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from mpi4py import MPI

from mpi_tp import launch
from reference import GPTConfig, NumpyBackend, generate, init_weights, preset
from reference.kv import KVShape
from reference.lanes import Lane

LOGIT_RTOL = 1e-5
N_SLOTS = 6
PAGED = KVShape(n_blocks=48, block_size=8)


def random_config(rng: np.random.Generator, world: int) -> GPTConfig:
    n_head = world * int(rng.integers(1, 3))
    return GPTConfig(
        n_layer=int(rng.integers(1, 4)),
        n_head=n_head,
        n_embd=n_head * int(rng.choice([4, 8, 16])),
        vocab_size=int(rng.integers(world, 300)),  # odd sizes split unevenly over the ranks
        n_ctx=64,
        n_inner=world * int(rng.integers(4, 40)),
    )


def random_requests(rng: np.random.Generator, config: GPTConfig, n: int) -> list[tuple[np.ndarray, int]]:
    """[(prompt, max_new_tokens)] that fit the context."""
    out = []
    for _ in range(n):
        prompt = rng.integers(0, config.vocab_size, int(rng.integers(1, 20)))
        out.append((prompt, int(rng.integers(1, min(16, config.n_ctx - len(prompt)) + 1))))
    return out


def forced_logits(backend, prompt: np.ndarray, tokens: list[int], slot: int = 0) -> np.ndarray:
    """Logits after the prompt and after each of ``tokens`` fed in turn: -> [len(tokens), V]."""
    out = [backend.prefill(slot, prompt)]
    for i, token in enumerate(tokens[:-1]):
        out.append(backend.decode(np.array([slot]), np.array([token]), np.array([len(prompt) + i]))[0])
    return np.stack(out)


def fused_logits(backend, requests, arrivals: np.ndarray, rng: np.random.Generator, stats: dict):
    """Greedy decoding with one running batch: request i joins at step arrivals[i]; when one
    leaves, the highest active slot moves into its hole (a shuffle). -> logits per request and step."""
    logs: list[list[np.ndarray]] = [[] for _ in requests]
    stats.update(max_batch=0, moves=0)
    active: dict[int, list[int]] = {}  # request -> [slot, token, position, made]
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    step = 0
    while pending or active:
        while pending and arrivals[pending[0]] <= step and len(active) < N_SLOTS:
            i = pending.pop(0)
            slot = min(set(range(N_SLOTS)) - {s for s, *_ in active.values()})
            logs[i].append(backend.prefill(slot, requests[i][0]))
            active[i] = [slot, int(np.argmax(logs[i][-1])), len(requests[i][0]), 1]
            if requests[i][1] == 1:
                del active[i]
        if active:
            order = rng.permutation(list(active))  # batch rows in any order
            rows = np.array([active[i][:3] for i in order]).T  # [3, B]: slots, tokens, positions
            out = backend.decode(rows[0], rows[1], rows[2])  # [B, V]
            stats["max_batch"] = max(stats["max_batch"], len(order))
            for b, i in enumerate(order):
                logs[i].append(out[b])
                state = active[i]
                state[1:] = [int(np.argmax(out[b])), state[2] + 1, state[3] + 1]
                if state[3] == requests[i][1]:
                    del active[i]
            used = {s: i for i, (s, *_) in active.items()}
            holes = set(range(N_SLOTS)) - set(used)
            if used and holes and min(holes) < max(used):  # fill the lowest hole with the highest active slot
                hole, top = min(holes), max(used)
                backend.move_slots(np.array([top]), np.array([hole]), np.array([active[used[top]][2]]))
                active[used[top]][0] = hole
                stats["moves"] += 1
        step += 1
    return logs


def check_model(name: str, config: GPTConfig, weights, tp, requests, rng: np.random.Generator) -> dict:
    ref = NumpyBackend(config, weights, n_slots=1)
    n_requests = len(requests)
    splits, split_steps, steps, worst = 0, 0, 0, 0.0
    for prompt, n_new in requests:
        want = list(generate(ref, prompt, n_new))
        got = list(generate(tp, prompt, n_new))
        splits += got != want
        a, b = forced_logits(ref, prompt, want), forced_logits(tp, prompt, want)  # [n_new, V] each
        worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(a))))
        split_steps += int(np.sum(np.argmax(a, -1) != np.argmax(b, -1)))
        steps += n_new
    assert worst <= LOGIT_RTOL, f"{name}: TP logits differ by {worst:.2e} relative, more than {LOGIT_RTOL}"

    stats: dict = {}
    fused = fused_logits(tp, requests, np.sort(rng.integers(0, 12, n_requests)), rng, stats)
    for i, ((prompt, _), logs) in enumerate(zip(requests, fused, strict=True)):
        serial = forced_logits(tp, prompt, [int(np.argmax(x)) for x in logs])  # the same tokens, one request alone
        for j, (x, y) in enumerate(zip(logs, serial, strict=True)):
            assert np.array_equal(x, y), f"{name}: request {i} step {j}: TP fused logits differ from TP serial"
    return dict(
        model=name, world=tp.world, requests=n_requests, split_requests=splits, steps=steps, split_steps=split_steps,
        max_rel_logit_error=worst, **stats, comm_seconds=tp.comm_seconds().tolist(),
    )  # fmt: skip


def check_ragged(name: str, tp, requests, rng: np.random.Generator) -> dict:
    """Each prompt whole into its own blocks, then all of them again in random chunks, side by side."""
    blocks = iter(rng.permutation(PAGED.n_blocks))
    prompts = [prompt for prompt, _ in requests[:4]]
    places = [[np.array([next(blocks) for _ in range(-(-len(p) // PAGED.block_size))]) for p in prompts] for _ in "ab"]
    whole = [tp.step([Lane.of(place, p, 0)])[0] for place, p in zip(places[0], prompts, strict=True)]
    cuts = [np.sort(rng.choice(np.arange(1, len(p)), rng.integers(min(1, len(p) - 1), len(p)), replace=False)) for p in prompts]
    chunks = [np.split(p, cut) for p, cut in zip(prompts, cuts, strict=True)]
    done, chunked, steps = [0] * len(prompts), [None] * len(prompts), 0
    while any(done[i] < len(chunks[i]) for i in range(len(prompts))):
        live = [i for i in range(len(prompts)) if done[i] < len(chunks[i])]
        starts = [sum(len(c) for c in chunks[i][: done[i]]) for i in live]
        out = tp.step([Lane.of(places[1][i], chunks[i][done[i]], start) for i, start in zip(live, starts, strict=True)])
        for row, i in enumerate(live):
            done[i] += 1
            chunked[i] = out[row]
        steps += 1
    for i, (a, b) in enumerate(zip(whole, chunked, strict=True)):
        assert np.array_equal(a, b), f"{name}: prompt {i} in chunks {[len(c) for c in chunks[i]]} differs from whole"
    return dict(ragged_prompts=len(prompts), ragged_steps=steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()
    world = MPI.COMM_WORLD.Get_size()
    rng = np.random.default_rng([args.seed, world])  # the same models on every rank
    tiny = preset("tiny")
    models = [  # (name, config, weights, vocab_parallel)
        ("tiny", tiny, init_weights(tiny, seed=args.seed), True),
        ("tiny-std0.3-replicated", tiny, init_weights(tiny, seed=args.seed, std=0.3), False),
    ]
    for k in range(3):
        config = random_config(rng, world)
        models.append((f"random{k}-{config}", config, init_weights(config, seed=args.seed + k, std=0.3), True))
    requests_rng = np.random.default_rng([args.seed, world, 1])  # used on rank 0 only
    for name, config, weights, vocab_parallel in models:
        tp = launch(config, weights, N_SLOTS, vocab_parallel=vocab_parallel)
        if tp is not None:
            requests = random_requests(requests_rng, config, args.requests)
            report = check_model(name, config, weights, tp, requests, requests_rng)
            tp.close()
        paged = launch(config, weights, PAGED, vocab_parallel=vocab_parallel)  # every rank launches both
        if paged is not None:
            report.update(check_ragged(name, paged, requests, requests_rng))
            paged.close()
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
