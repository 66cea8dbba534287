"""Observability: structured logging set-up, metrics, alerts."""
