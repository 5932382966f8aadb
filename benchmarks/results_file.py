"""Moved into benchmarks/harness.py. Kept only while serving_cpu.py still imports it; delete it then."""

from benchmarks.harness import machine, today, write_section

__all__ = ["machine", "today", "write_section"]
