"""The SDK's decisions, without I/O: the requests each call sends, which replica gets
them, what a failure means, and what a resumed stream still owes.

`MemoryClient` (sync.py) and `AsyncMemoryClient` (aio.py) only carry out the
steps a plan (plans.py) asks for, blocking or awaiting.
"""
