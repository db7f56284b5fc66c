"""Benchmarks (not tests): ``ddn-node bench model``."""
