"""Persistence and coordination: SQL metadata, hot state and leases, durable files.

Import from the submodules (``memsvc.store.metadata``, ``memsvc.store.hot_state``,
...); this package imports nothing itself so that using one backend never loads
the drivers of another.
"""
