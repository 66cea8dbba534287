"""Reliability checks of a running service: bad input, and what it must never do."""
