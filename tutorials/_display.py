"""Where the lessons put their pictures, and how they show them.

``OUT`` is the folder named by ``FLOVER_TUTORIAL_OUT`` (default ``out/tutorials``);
``show(fig, name)`` saves a Matplotlib figure there and draws it inside Jupyter;
``show_file(path)`` draws a picture already on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt

OUT = Path(os.environ.get("FLOVER_TUTORIAL_OUT", "out/tutorials"))
OUT.mkdir(parents=True, exist_ok=True)


def show_file(path: Path) -> Path:
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return path
    if get_ipython() is not None:
        display(Image(filename=str(path)))
    return path


def show(fig, name: str) -> Path:
    path = OUT / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return show_file(path)
