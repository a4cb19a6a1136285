"""Benchmarks: each prints its figures as `name: value unit`, one per line."""
