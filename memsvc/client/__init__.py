"""The memsvc SDK: `MemoryClient` (blocking) and `AsyncMemoryClient` (asyncio).

    from memsvc.client import MemoryClient

    with MemoryClient("localhost:50051", api_key) as client:
        session = client.create_session("notes")
        session.append("The pass key is 71432. Remember it.")
        print(session.query("What is the pass key?", max_new_tokens=8, temperature=0))

Needs only grpcio and protobuf at run time (no torch). Failed calls raise the
typed errors of `memsvc.client.errors`.
"""

from memsvc.client.aio import AsyncMemoryClient, AsyncSession
from memsvc.client.errors import MemsvcError
from memsvc.client.retry import RetryPolicy
from memsvc.client.sync import MemoryClient, Session

__all__ = [
    "AsyncMemoryClient",
    "AsyncSession",
    "MemoryClient",
    "MemsvcError",
    "RetryPolicy",
    "Session",
]
