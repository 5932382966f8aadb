"""What every benchmark script shares: its first lines, its timing, and its section of RESULTS.md.

A script is run as ``python benchmarks/<name>.py`` (its folder is then on
``sys.path``) and begins

    import harness  # first: puts the repository on sys.path; imports nothing that loads NumPy

    ARGS = harness.parser(__doc__, quick="tiny preset: checks the script runs").parse_args()
    harness.start(threads=ARGS.threads)  # before NumPy loads

    import numpy as np  # noqa: E402

Figures are compared side by side in one run: variants take turns in rounds,
so that a noisy neighbour slows them alike, and a figure is the best round's
median (``best_of_rounds`` over ``median_s``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HEADER = "# Measured results\n\nEvery figure the README quotes, with the command that produced it.\n"
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
Key = TypeVar("Key", bound=Hashable)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------ the start of a script


def parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """The script's docstring as its help, with the two flags every script has: --quick and --no-write."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p


def thread_env(threads: int) -> dict[str, str]:
    """The variables that size Numba's, OpenMP's, OpenBLAS's and MKL's thread pools, each to ``threads``."""
    return {name: str(threads) for name in THREAD_VARIABLES}


def start(threads: int | None = None) -> None:
    """Size the thread pools (None: leave them as the environment says), then import ``reference``,
    which sets the OpenMP and OpenBLAS wait policies. Both are read as NumPy, Numba and torch load."""
    if "numpy" in sys.modules and (threads is not None or "reference" not in sys.modules):
        raise RuntimeError("harness.start() must run before NumPy is imported: NumPy's BLAS reads the settings once")
    if threads is not None:
        os.environ.update(thread_env(threads))
    import reference  # noqa: F401


# ------------------------------------------------------------------ timing


def times_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones (compilation, caches,
    and the previous variant's threads going to sleep)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return times


def median_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    return statistics.median(times_s(fn, repeats, warmup))


def best_of_rounds(measures: dict[Key, Callable[[], float]], rounds: int,
                   after_each: Callable[[], object] | None = None) -> dict[Key, float]:  # fmt: skip
    """Each measure's lowest figure over ``rounds`` rounds; within a round the measures take turns."""
    best: dict[Key, float] = {}
    for _ in range(rounds):
        for key, measure in measures.items():
            best[key] = min(best.get(key, float("inf")), measure())
            if after_each is not None:
                after_each()
    return best


def decode_step(backend, batch: int, position: int) -> Callable[[], object]:
    """One decode step of ``batch`` requests in slots 0..batch-1, each at ``position``, as a function to time.
    Its cost depends on neither the tokens nor what the KV slots hold."""
    import numpy as np  # here, not above: a script imports this module before NumPy may load

    slots, tokens, positions = np.arange(batch), np.zeros(batch, np.int64), np.full(batch, position)
    return lambda: backend.decode(slots, tokens, positions)


# ------------------------------------------------------------------ RESULTS.md


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def today() -> str:
    return datetime.date.today().isoformat()


def command_line() -> str:
    """How this script was run, as RESULTS.md quotes it: ``python benchmarks/<name>.py <flags>``."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace the text between <!-- name:begin --> and <!-- name:end --> in RESULTS.md, or append it;
    the other sections stay as they are."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote the {name} section of {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
