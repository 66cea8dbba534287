"""The gRPC server: thin servicers over the session layer, a batching scheduler, auth and limits.

Requests flow one way: servicer (translate) -> scheduler (batch, off the event
loop) -> SessionManager -> engine. `MemoryServer` assembles and runs them.
"""
