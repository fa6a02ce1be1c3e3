"""Liveness (/health), readiness (/ready) and Prometheus metrics (/metrics)."""
