"""Flover's memory shuffle: make the active slots contiguous with the fewest moves.

With k active slots, slide a window of length k over the slots and pick the
one holding the most active slots (the leftmost on ties). Every active slot
outside it moves into a hole inside it, holes filled left to right. Each
active slot outside the final window must move at least once, and this
window leaves the fewest outside, so no plan uses fewer moves.
"""

from __future__ import annotations

from collections.abc import Sequence


def window(active: Sequence[bool]) -> tuple[int, int]:
    """The span [first, last + 1) that a fused step computes over; (0, 0) when idle."""
    used = [i for i, a in enumerate(active) if a]
    return (used[0], used[-1] + 1) if used else (0, 0)


def best_window(active: Sequence[bool]) -> int:
    """Start of the length-k window holding the most active slots."""
    k = sum(active)
    count = sum(active[:k])
    best, best_start = count, 0
    for start in range(1, len(active) - k + 1):
        count += active[start + k - 1] - active[start - 1]
        if count > best:
            best, best_start = count, start
    return best_start


def shuffle_plan(active: Sequence[bool]) -> list[tuple[int, int]]:
    """(source, destination) slot moves that make the active slots contiguous."""
    k = sum(active)
    if k == 0:
        return []
    start = best_window(active)
    inside = range(start, start + k)
    holes = [i for i in inside if not active[i]]
    outside = [i for i, a in enumerate(active) if a and i not in inside]
    return list(zip(outside, holes, strict=True))


def has_hole(active: Sequence[bool]) -> bool:
    first, last = window(active)
    return sum(active) < last - first


def choose_slot(active: Sequence[bool]) -> int:
    """A free slot for a newcomer that keeps the window as short as it can be:
    a hole inside the window, else the slot just after it, else the one just before."""
    first, last = window(active)
    if first == last:
        return active.index(False)
    for i in range(first, last):
        if not active[i]:
            return i
    if last < len(active):
        return last
    if first > 0:
        return first - 1
    raise ValueError("no free slot")
