"""Calibration's busy neighbours: processes that step a model of their own until stopped."""

from __future__ import annotations

import pytest

from flover.sim.neighbour import NeighbourProcesses
from reference.config import PRESETS


def test_neighbours_step_until_stopped_and_a_failed_start_says_why():
    with NeighbourProcesses(PRESETS["tiny"], 2) as neighbours:
        started = list(neighbours.processes)
        assert len(started) == 2 and all(p.poll() is None for p in started)  # each said ready, and still steps
    assert all(p.returncode is not None for p in started) and not neighbours.processes
    with pytest.raises(RuntimeError, match="failed to start"), NeighbourProcesses("not a model config", 1):
        pass
