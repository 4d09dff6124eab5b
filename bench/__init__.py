"""Benchmarks of prefect-nanobanana: `python -m bench [polling] [memory] [startup]`.

Not part of the test suite (pytest collects only `tests/`). Each benchmark
compares against a baseline measured in the same process, prints the machine
it ran on, a table and a verdict, and writes `bench/results/<name>.json`.
"""
