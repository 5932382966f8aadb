"""GEMM dispatch: which variant, with which tiles, for a shape (M, N, K).

The table is ``tuning.json`` beside this file, written on a GPU by
``python -m numba_kernels.tune`` and keyed by device name::

    {"NVIDIA H100 80GB HBM3": {"1x2304x768": {"kernel": "gemv", "params": [128, 1]}, ...}}

Lookup for (M, N, K): the entry for exactly that shape; else, for the same
(N, K), the entry with the largest tuned M not above M (batch sizes between
two tuned ones take the smaller one's choice); else the default rule:

    M <= 8  ->  staged (version 4), 128 threads, strips of BN = 8 columns,
                ROWS = M rounded up to a power of two, chunks of KC = 512 k
                (256 from 4 rows, to fit shared memory; less when K is
                shorter): N / 8 blocks, 16 KB in flight each
    M <= 64 ->  tiled (version 2), 32 x 32 tiles, BK = 16, 4 x 4 outputs per
                thread (64 threads; small tiles keep many blocks in flight at
                GPT-2 widths)
    M >  64 ->  prefetch (version 5): 128 x 128 tiles, 8 x 8 a thread, the
                next tile in registers (a prefill)

Every variant gives bitwise the same result (see ``gemm.py``), so the table
decides speed only, never a number. (Under the CUDA simulator, where each
GPU thread is a Python thread, the default staged GEMV has 32 threads, or
BN x ROWS if more: the same chunks and sums, fewer threads to start.)
``linear`` runs a GEMM with its
epilogue (``epilogue.py``): in the same launch when the chosen variant fuses
it, else as the separate kernels; bitwise the same either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from numba_kernels.device import device_name, simulated
from numba_kernels.epilogue import BIAS, separately
from numba_kernels.gemm import FUSING, Variant, launch
from numba_kernels.gemm_staged import THREADS as STAGED_THREADS

TABLE_PATH = Path(__file__).with_name("tuning.json")
GEMV_MAX_ROWS = 8
DEFAULT_TILE = (32, 32, 16, 4, 4)
STRIP = 8  # BN of the staged GEMV: a k row of the strip is one 32-byte sector
TILED_MAX_ROWS = 64  # above: 128 x 128 tiles give every block 64 outputs a thread


def shape_key(m: int, n: int, k: int) -> str:
    return f"{m}x{n}x{k}"


def default_variant(m: int, n: int, k: int) -> Variant:
    if m <= GEMV_MAX_ROWS:
        rows = 1
        while rows < m:
            rows *= 2
        threads = max(32, STRIP * rows) if simulated() else STAGED_THREADS
        step = threads // min(STRIP, rows)  # every thread stages as many floats of x and of w
        return Variant("staged", (threads, STRIP, rows, min(512 if rows <= 2 else 256, -(-k // step) * step)))
    return Variant("tiled", DEFAULT_TILE) if m <= TILED_MAX_ROWS else Variant("prefetch", ())


def load_table(device: str | None = None, path: Path = TABLE_PATH) -> dict[str, Variant]:
    """This device's entries of the table at ``path``; empty when there are none."""
    if not Path(path).exists():
        return {}
    entries = json.loads(Path(path).read_text()).get(device or device_name(), {})
    return {key: Variant(e["kernel"], tuple(e["params"])) for key, e in entries.items()}


def save_table(table: dict[str, Variant], device: str, path: Path = TABLE_PATH) -> None:
    """Write this device's entries into the table at ``path``, keeping other devices'."""
    path = Path(path)
    everything = json.loads(path.read_text()) if path.exists() else {}
    everything[device] = {key: {"kernel": v.kernel, "params": list(v.params)} for key, v in sorted(table.items())}
    path.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")


class Dispatch:
    """Picks a variant per shape from a table and launches it."""

    def __init__(self, table: dict[str, Variant] | None = None) -> None:
        self.table = load_table() if table is None else table
        self._tuned_m: dict[tuple[int, int], list[int]] = {}
        for key in self.table:
            m, n, k = (int(s) for s in key.split("x"))
            self._tuned_m.setdefault((n, k), []).append(m)
        self._memo: dict[tuple[int, int, int], Variant] = {}

    def choose(self, m: int, n: int, k: int) -> Variant:
        if (m, n, k) not in self._memo:
            below = [tm for tm in self._tuned_m.get((n, k), []) if tm <= m]
            if below:
                self._memo[m, n, k] = self.table[shape_key(max(below), n, k)]
            else:
                self._memo[m, n, k] = default_variant(m, n, k)
        return self._memo[m, n, k]

    def gemm(self, x, w, b, out, stream=0):
        """out[M, N] = x[M, K] @ w[K, N] + b[N]; -> out."""
        launch(self.choose(x.shape[0], w.shape[1], x.shape[1]), x, w, b, out, stream)
        return out

    def linear(self, x, w, b, out, epilogue: str = BIAS, aux=(), scratch=None, stream=0):
        """The GEMM and its epilogue; ``scratch`` [M, N]: where an unfused residual GEMM writes first. -> out."""
        variant = self.choose(x.shape[0], w.shape[1], x.shape[1])
        if variant.kernel in FUSING or epilogue == BIAS:
            launch(variant, x, w, b, out, stream, epilogue, aux)
        else:
            y = scratch if epilogue == "residual" else out
            launch(variant, x, w, b, y, stream)
            separately(epilogue, out, y, aux)
        return out
