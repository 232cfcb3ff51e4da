"""Benchmarks: ferry's live migration against the plain-QMP floor (`python -m scripts.bench`).

Not tests: figures, not pass/fail.  See scripts/bench/RESULTS.md for the last run.
"""
