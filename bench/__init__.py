"""Benchmarks: each scenario prints its figure beside the ceiling measured in the same run."""
