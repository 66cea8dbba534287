"""Observability: structured logging, Prometheus metrics, per-session guards and their
mitigations, the recall canary, `memsvc top`."""
