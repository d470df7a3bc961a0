"""Load benchmarks: the cluster against the raw model and a single-process server."""
