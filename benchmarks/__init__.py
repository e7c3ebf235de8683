"""Benchmarks: scripts that measure the library side by side in one run, and the worker code only they use.

A package so that Ray workers and spawned processes can import the timed workers by name
(``benchmarks.align_bench``) with only the checkout on ``PYTHONPATH``.
"""
