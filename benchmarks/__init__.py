"""Benchmarks: each measures stepworker against a baseline in the same run (see README.md)."""
