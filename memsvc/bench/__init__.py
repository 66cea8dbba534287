"""Benchmarks: `memsvc bench ...` and the peers each one is compared with."""
