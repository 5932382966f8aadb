"""Decode-step time on the CPU: our batch-invariant kernels, our BLAS path, and Hugging Face transformers.

    python benchmarks/decode_cpu.py                  # gpt2 shape, batch 1 and 32, written to RESULTS.md
    python benchmarks/decode_cpu.py --quick          # tiny preset: checks the script runs

All three run the same random weights (``reference.init_weights``), fp32, on
``--threads`` threads (Numba, BLAS and torch alike). A step decodes B requests
at position P, so each attends over P cached positions and its own: ours
read KV slots filled with random values (a step's cost does not depend on
what they hold, but untouched zero pages would be free to read), transformers
reads the ``past_key_values`` of a P-token forward, cropped back to P after
each step. Variants take turns in rounds so that a noisy neighbour slows them
alike; a figure is the best round's median step.
"""

from __future__ import annotations

import argparse
import os

import harness  # first of ours: puts the repository on sys.path, loads no NumPy


def parse_args() -> argparse.Namespace:
    p = harness.parser(__doc__, quick="tiny preset, 2 rounds: checks the script runs")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--position", type=int, default=128, help="cached positions before the decoded token")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    args = p.parse_args()
    if args.quick:
        args.model, args.batches, args.position, args.rounds, args.steps, args.no_write = "tiny", "1,4", 16, 2, 3, True
    return args


ARGS = parse_args()
harness.start(threads=ARGS.threads)  # before NumPy, Numba and torch start their thread pools

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402

from reference import GPTConfig, NumpyBackend, init_weights, preset  # noqa: E402
from reference.checkpoint import config_to_json, weights_to_tensors  # noqa: E402

VARIANTS = {  # key: what the table calls it
    "hf": "transformers (torch)",
    "invariant": "ours, batch-invariant kernels",
    "blas": "ours, BLAS (invariant=False)",
}


def hf_model(config: GPTConfig, weights) -> transformers.GPT2LMHeadModel:
    """GPT2LMHeadModel holding our weights (LM head tied to wte, as in ours)."""
    hf_config = transformers.GPT2Config(
        **config_to_json(config), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    state = {name: torch.from_numpy(array) for name, array in weights_to_tensors(weights).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model


class HFStep:
    """One decode step of B requests in transformers, over a KV cache of ``position`` tokens."""

    def __init__(self, model, config: GPTConfig, batch: int, position: int) -> None:
        self.model, self.position = model, position
        rng = np.random.default_rng(1)
        prompt = torch.from_numpy(rng.integers(0, config.vocab_size, size=(batch, position)))  # [B, P]
        self.token = torch.from_numpy(rng.integers(0, config.vocab_size, size=(batch, 1)))  # [B, 1]
        with torch.inference_mode():
            self.cache = model(prompt, use_cache=True).past_key_values  # P positions

    def __call__(self) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(self.token, cache=self.cache, use_cache=True).logits  # [B, 1, V]
        self.cache.crop(-1)  # back to P positions
        return logits[:, -1].numpy()


class OurStep:
    """One decode step of B requests in our backend, at position ``position`` of slots 0..B-1."""

    def __init__(self, backend: NumpyBackend, batch: int, position: int) -> None:
        rng = np.random.default_rng(2)
        shape = backend.cache.k[:, :batch, :, :position].shape  # [L, B, H, P, D]
        backend.cache.k[:, :batch, :, :position] = rng.standard_normal(shape, dtype=np.float32)
        backend.cache.v[:, :batch, :, :position] = rng.standard_normal(shape, dtype=np.float32)
        self.step = harness.decode_step(backend, batch, position)

    def __call__(self) -> np.ndarray:
        return self.step()


def vector_width() -> str:
    """The widest vectors Numba's LLVM target will use here (the invariant matmul is written for 512)."""
    import llvmlite.binding as llvm
    import numba

    features = numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    if "+avx512f" not in features:
        return "256-bit or narrower (no AVX-512)"
    return "256-bit (LLVM's tuning prefers them)" if "-prefer-256-bit" not in features else "512-bit"


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    config = preset(ARGS.model)
    batches = [int(b) for b in ARGS.batches.split(",")]
    weights = init_weights(config, seed=0)
    n_slots = max(batches)
    backends = {
        "invariant": NumpyBackend(config, weights, n_slots, invariant=True),
        "blas": NumpyBackend(config, weights, n_slots, invariant=False),
    }
    model = hf_model(config, weights)
    check_agreement(model, config, weights)
    steps = {}
    for b in batches:
        steps[("hf", b)] = HFStep(model, config, b, ARGS.position)
        for name, backend in backends.items():
            steps[(name, b)] = OurStep(backend, b, ARGS.position)

    measures = {key: lambda step=step: 1e3 * harness.median_s(step, ARGS.steps, warmup=2) for key, step in steps.items()}
    with tqdm(total=ARGS.rounds * len(steps), desc="decode steps", unit="variant") as bar:
        best = harness.best_of_rounds(measures, ARGS.rounds, after_each=bar.update)
    report(config, batches, best)


def check_agreement(model, config: GPTConfig, weights) -> None:
    """Our two paths and transformers give one token the same logits (to float32 rounding):
    otherwise the timings would compare different computations."""
    token = np.array([7])
    with torch.inference_mode():
        expected = model(torch.from_numpy(token[None])).logits[0, -1].numpy()  # [V]
    for invariant_path in (True, False):
        backend = NumpyBackend(config, weights, 1, invariant=invariant_path)
        logits = backend.decode(np.array([0]), token, np.array([0]))[0]  # [V]
        err = float(np.abs(logits - expected).max() / np.abs(expected).max())
        if err > 1e-4:
            raise RuntimeError(f"our decode (invariant={invariant_path}) differs from transformers by {err:.1e}")


def report(config: GPTConfig, batches: list[int], best: dict) -> None:
    lines = [
        f"| path | {' | '.join(f'B={b} ms/step' for b in batches)} | {' | '.join(f'B={b} vs transformers' for b in batches)} |",
        "|---|" + "---:|" * (2 * len(batches)),
    ]
    for key, label in VARIANTS.items():
        ms = [best[(key, b)] for b in batches]
        ratios = [best[("hf", b)] / best[(key, b)] for b in batches]
        lines.append(f"| {label} | {' | '.join(f'{m:.1f}' for m in ms)} | {' | '.join(f'{r:.2f}x' for r in ratios)} |")
    tokens = [f"B={b}: " + ", ".join(f"{k} {1e3 * b / best[(k, b)]:.0f}" for k in VARIANTS) for b in batches]
    table = "\n".join(lines)
    print(table)
    print("tokens/s  " + "; ".join(tokens))
    print(f"Numba vectors: {vector_width()}")
    if ARGS.no_write:
        return
    body = f"""## Decode step on the CPU: ours vs transformers

`{harness.command_line()}` on {harness.machine()}, {harness.today()}; load average at the end {os.getloadavg()[0]:.1f}.
Model `{ARGS.model}` (random weights, fp32), {ARGS.threads} threads each for Numba, BLAS and torch
(transformers {transformers.__version__}, torch {torch.__version__}). A step decodes B requests
with {ARGS.position} cached positions each; a figure is the best of {ARGS.rounds} rounds' median of {ARGS.steps}
steps. "vs transformers" is transformers' time divided by ours (above 1: we are faster).

{table}

Tokens per second: {"; ".join(tokens)}.
Numba's vectors: {vector_width()}.
"""
    harness.write_section("decode_cpu", body)


if __name__ == "__main__":
    main()
