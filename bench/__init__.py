"""Benchmarks: plain scripts (`python bench/<name>.py [--quick]`), one JSON line per result.

`python bench/run_all.py --quick` runs them all and rewrites the CPU rows of docs/BENCHMARKS.md.
"""
