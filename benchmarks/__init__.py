"""Benchmarks for revwire: `python -m benchmarks.run` (see benchmarks/README.md)."""
