"""Benchmarks of replicator against Litestream (issue 5): see run.py."""
