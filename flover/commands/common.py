"""Flags shared by several subcommands."""

from __future__ import annotations

import argparse

from flover.backends import BACKENDS


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a preset (tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a checkpoint "
                        "directory; default: the small trained model shipped with flover")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--backend", choices=BACKENDS, default="numpy",
                   help="numpy (batch invariant, default), numpy-blas, or numba (CUDA)")
    p.add_argument("--tp", action="store_true",
                   help="tensor parallel over the MPI ranks of this job (run under mpiexec)")  # fmt: skip
