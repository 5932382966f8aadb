"""Run under ``NUMBA_ENABLE_CUDASIM=1 mpiexec -n N python tests/mpi/tp_numba.py``.

The numba inner of tensor parallelism (``numba_kernels.TPShard``, each rank
on its own simulated GPU) against one process: rank 0 drives the
tensor-parallel backend and checks, on a tiny model,

- greedy tokens equal those of the single-process ``NumbaBackend``, and every
  step's logits agree to rounding (the reductions are split across ranks);
- TP fused equals TP serial bitwise: a decode lane and a prefill chunk in one
  step give each lane's logits of its prompt alone, and a shuffle (``move``)
  keeps a request's logits.

Rank 0 prints one JSON line; a failed check raises, which aborts the job.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("MPIR_CVAR_POLLS_BEFORE_YIELD", "100")  # a waiting rank yields its core to the simulator's threads

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpi_tp import launch  # noqa: E402
from numba_kernels import NumbaBackend  # noqa: E402
from numba_kernels.simulator import quick_switching  # noqa: E402
from reference import GPTConfig, Lane, init_weights  # noqa: E402

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_ctx=16)
REQUESTS = [([3, 1, 4], 2), ([7, 2], 2)]
LOGIT_RTOL = 1e-5


def main() -> None:
    weights = init_weights(CONFIG, seed=3, std=0.3)
    tp = launch(CONFIG, weights, 4, inner="numba")  # ranks 1..N-1 serve inside this call
    if tp is None:
        return
    single = NumbaBackend(CONFIG, weights, n_slots=4)
    report = dict(world=MPI.COMM_WORLD.Get_size(), tokens=[], max_rel_logit_error=0.0)
    for prompt, n_new in REQUESTS:  # greedy, each step's logits compared
        tokens, position = [], len(prompt)
        a, b = single.prefill(0, np.array(prompt)), tp.prefill(0, np.array(prompt))
        while True:
            report["max_rel_logit_error"] = max(report["max_rel_logit_error"], float(np.max(np.abs(a - b)) / np.max(np.abs(a))))
            assert int(np.argmax(a)) == int(np.argmax(b)), f"TP numba token {np.argmax(b)} differs from {np.argmax(a)}"
            tokens.append(int(np.argmax(a)))
            if len(tokens) == n_new:
                break
            step = (np.array([0]), np.array([tokens[-1]]), np.array([position]))
            a, b, position = single.decode(*step)[0], tp.decode(*step)[0], position + 1
        report["tokens"].append(tokens)
    assert report["max_rel_logit_error"] <= LOGIT_RTOL, report

    tp.step([Lane.of([1], [9, 8], 0)]), tp.step([Lane.of([2], [4], 0)])
    both = tp.step([Lane.of([1], [3], 2), Lane.of([2], [5, 1], 1)])  # a decode beside a prefill chunk
    again = [tp.step([Lane.of([3], [9, 8, 3], 0)])[0], tp.step([Lane.of([0], [4, 5, 1], 0)])[0]]
    assert np.array_equal(both[0], again[0]) and np.array_equal(both[1], again[1]), "TP fused differs from TP serial"
    tp.move_slots(np.array([3]), np.array([1]), np.array([3]))  # the request of slot 3 moves into slot 1
    moved = tp.step([Lane.of([1], [2], 3)])[0]
    assert np.array_equal(moved, tp.step([Lane.of([3], [2], 3)])[0]), "a moved request's logits changed"
    report["comm_seconds"] = tp.comm_seconds().tolist()
    tp.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    with quick_switching():
        main()
