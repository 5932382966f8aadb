"""Every lesson in tutorials/ runs to its end as a plain script, in under a minute.

Each lesson asserts what it claims, so a claim that stops being true fails here.
New lessons (``tutorials/NN_name.py``) are picked up without editing this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
LESSONS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 120
BUDGET_S = 60


def test_there_are_lessons():
    assert LESSONS, f"no lessons found in {TUTORIALS}"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_green_under_a_minute(lesson: Path, tmp_path: Path):
    env = {**os.environ, "FLOVER_TUTORIAL_OUT": str(tmp_path / "out"), "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(lesson)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        stderr = timeout.stderr or b""
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        pytest.fail(f"{lesson.name} ran past {TIMEOUT_S} s:\n{stderr[-6000:]}")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, f"{lesson.name} exited with status {done.returncode}:\n{done.stderr[-6000:]}"
    assert elapsed < BUDGET_S, f"{lesson.name} took {elapsed:.1f} s; a lesson must run in under {BUDGET_S} s"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_opens_as_a_notebook(lesson: Path):
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(lesson)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert notebook.metadata["jupytext"]["text_representation"]["format_name"] == "percent"
    assert kinds.count("markdown") >= 3 and kinds.count("code") >= 3, f"{lesson.name}: {kinds}"
    assert kinds[0] == "markdown", f"{lesson.name} should open with a title cell"


def test_readme_lists_every_lesson():
    readme = (TUTORIALS / "README.md").read_text()
    listed = set(re.findall(r"\b(\d\d_\w+\.py)\b", readme))
    missing = sorted(p.name for p in LESSONS if p.name not in listed)
    assert not missing, f"tutorials/README.md does not list {missing}"


def glossary() -> list[tuple[str, int]]:
    """(term, the lesson that explains it) for each row of the glossary table in tutorials/README.md."""
    readme = (TUTORIALS / "README.md").read_text()
    assert "## Glossary" in readme, "tutorials/README.md has no glossary"
    section = readme.split("## Glossary", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| \*\*(.+?)\*\* \| \[(\d\d)\]\(\d\d_\w+\.py\) \|", section, flags=re.M)
    return [(term, int(number)) for term, number in rows]


def lesson_text(lesson: Path) -> str:
    """The lesson without its Jupytext header (its metadata mention words like 'kernelspec')."""
    text = lesson.read_text()
    return text.split("# %%", 1)[1] if "# %%" in text else text


def mentions(text: str, term: str) -> bool:
    """The term as a word of its own, or its plural."""
    return re.search(rf"(?<![\w-]){re.escape(term)}(?:s|es)?(?![\w-])", text, flags=re.I) is not None


def test_glossary_terms_are_explained_before_any_lesson_uses_them():
    """The path's rule, checked where a machine can: no lesson uses a glossary term before the one explaining it."""
    terms = glossary()
    assert len(terms) >= 20, f"the glossary lists only {len(terms)} terms"
    by_number = {int(p.name[:2]): p for p in LESSONS}
    for term, number in terms:
        assert number in by_number, f"glossary: {term!r} points to lesson {number}, which does not exist"
        assert mentions(lesson_text(by_number[number]), term), f"glossary: lesson {number} never says {term!r}"
        first = min(n for n, p in by_number.items() if mentions(lesson_text(p), term))
        assert first >= number, (f"{by_number[first].name} uses {term!r}, which the glossary says lesson {number} "
                                 f"explains: explain it where it is first used, or point the glossary there")  # fmt: skip
