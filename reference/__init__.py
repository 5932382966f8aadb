"""GPT-2 in readable NumPy: the ground truth and the default backend of flover."""

import os

# Numba's OpenMP threads spin after each parallel loop by default, stealing the
# cores that BLAS or another model instance needs next; measured on a
# busy 2-core machine, a gpt2 decode step took 364 ms spinning and 118 ms passive.
# Fully passive threads sleep at once, though, and a decode step runs about a
# hundred parallel loops: waking them cost 13.3 ms against 10.7 ms for a gpt2
# step at batch 1. A short spin (about ten microseconds) keeps both gains.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# OpenBLAS's threads spin for about 2**28 cycles (0.1 s) after each call; after
# a BLAS prefill they took the cores from the next few Numba decode steps,
# which ran 2.5 to 4 times slower (gpt2, 2 cores). 2**4 cycles: sleep at once.
# OpenBLAS reads this when NumPy loads, so import reference before NumPy.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from reference.backend import Backend, LaneBackend, NumpyBackend
from reference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from reference.config import PRESETS, GPTConfig, preset
from reference.generate import check_request, generate, load_model
from reference.kv import KVBlocks, KVShape, KVSlots
from reference.lanes import Lane, plan_rows
from reference.model import forward
from reference.sampling import Sampler, SamplingParams
from reference.tokenizer import ByteTokenizer, load_tokenizer
from reference.weights import GPT2Weights, init_weights

__all__ = [
    "Backend", "ByteTokenizer", "CheckpointError", "GPT2Weights", "GPTConfig", "KVBlocks", "KVShape", "KVSlots",
    "Lane", "LaneBackend", "NumpyBackend", "PRESETS", "Sampler", "SamplingParams", "check_request", "forward",
    "generate", "init_weights", "load_checkpoint", "load_model", "load_tokenizer", "plan_rows", "preset",
    "save_checkpoint",
]  # fmt: skip
