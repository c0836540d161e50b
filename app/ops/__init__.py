"""Operational endpoints: liveness, readiness, metrics."""
