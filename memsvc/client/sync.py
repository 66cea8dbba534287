"""`MemoryClient`: the blocking SDK. It carries out the plans of memsvc.client.core,
blocking on each step; the decisions are all there.

with MemoryClient("localhost:50051", api_key) as client:
    session = client.create_session("notes")
    session.append("The pass key is 71432. Remember it.")
    print(session.query("What is the pass key?", max_new_tokens=8, temperature=0))
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from memsvc.client.core import calls
from memsvc.client.core.calls import Upload
from memsvc.client.core.handles import ClientCore, SessionCore
from memsvc.client.core.plans import END, Deliver, Failed, Pause, Plan, Read, Start, Step, Steps
from memsvc.client.core.stream import AppendStream, Attempt
from memsvc.client.messages import Data, input_message
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc

Replica = tuple[grpc.Channel, pb_grpc.MemoryServiceStub]


class MemoryClient(ClientCore[Replica]):
    """A tenant's blocking connection to a memsvc server or cluster (arguments: `ClientCore`)."""

    def _connect(self, address: str) -> Replica:
        channel = dataclasses.replace(self.connection, address=address).channel()
        return channel, pb_grpc.MemoryServiceStub(channel)

    def _wait(self, step: Step) -> Any:
        """The outcome of one step, blocking (a gRPC error as `Failed`)."""
        try:
            if isinstance(step, Pause):
                time.sleep(step.seconds)
                return None
            if isinstance(step, Read):
                return next(step.responses, END)
            assert isinstance(step, Start)
            request = step.request
            if isinstance(request, Upload):
                request = itertools.chain([request.first], map(request.take, request.items))
            timeout = None if step.streaming else self.timeout
            method = getattr(step.stub, step.method)
            return method(request, metadata=self.connection.metadata, timeout=timeout)
        except grpc.RpcError as error:
            return Failed(error)

    def each(self, plan: Plan[None]) -> Iterator[Any]:
        """What ``plan`` delivers, as it comes."""
        with Steps(plan) as steps:
            for step in steps:
                if isinstance(step, Deliver):
                    yield step.item
                else:
                    steps.reply(step, self._wait(step))

    def one(self, plan: Plan[None]) -> Any:
        """The one item ``plan`` delivers (a unary call's answer)."""
        with contextlib.closing(self.each(plan)) as items:
            return next(items)

    def create_session(self, name: str = "") -> Session:
        return Session(self, self.one(self.answer(calls.create_session(name))))

    def open_session(self, session_id: str) -> Session:
        """A handle on an existing session (NotFoundError if this tenant has none such)."""
        return Session(self, self.one(self.answer(calls.get_session(session_id, routed=False))))

    def list_sessions(self) -> list[pb.Session]:
        return list(self.one(self.answer(calls.list_sessions())).sessions)

    def import_session(self, chunks: Iterable[bytes], name: str = "") -> Session:
        """A new session from an export's bytes (e.g. `Session.export()`'s chunks)."""
        return Session(self, self.one(self.answer(calls.import_session(name, chunks))))

    def close(self) -> None:
        for channel, _ in self.replicas.connections():
            channel.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session(SessionCore[MemoryClient]):
    """One session of the client's tenant, called blocking (see `SessionCore`)."""

    def refresh(self) -> pb.Session:
        return self.client.one(self._refresh())

    def append(self, data: Data) -> pb.AppendAck:
        """Appends text (str, UTF-8 bytes) or token ids; returns once they are durable."""
        return self.client.one(self._append(data))

    def append_stream(self, pieces: Iterable[Data], window: int = 4) -> Iterator[pb.AppendAck]:
        """Appends each piece over one stream, with at most `window` unacknowledged;
        yields their acknowledgements in order. Faster than `append` in a loop.
        Resumes on the session's next owner if its replica fails (core/stream.py)."""
        appender = _Appender(AppendStream(self, window), (input_message(p) for p in pieces))
        return self.client.each(appender.stream.plan(appender.requests, appender.wake))

    def query(self, prompt: Data, **sampling: Any) -> str:
        """The answer to `prompt` from a copy of the memory; the session is unchanged.
        sampling: see `memsvc.client.messages.prompt_message`."""
        return self.client.one(self._query(prompt, sampling))

    def generate(self, prompt: Data, **sampling: Any) -> Iterator[str]:
        """Appends the prompt and samples; yields text as it comes. Prompt and output
        become part of the stream."""
        return self.client.each(self._generate(prompt, sampling))

    def checkpoint(self) -> pb.CheckpointInfo:
        return self.client.one(self.client.answer(calls.checkpoint(self.id)))

    def fork(self, name: str = "") -> Session:
        return Session(self.client, self.client.one(self.client.answer(calls.fork(self.id, name))))

    def export(self, chunk_bytes: int = 0) -> Iterator[bytes]:
        """The session's memory as chunks of bytes (`MemoryClient.import_session` takes them);
        chunk_bytes 0: the server's default (1 MiB, or less under its message limit)."""
        return self.client.each(self._export(chunk_bytes))

    def delete(self) -> None:
        self.client.one(self.client.answer(calls.delete_session(self.id)))


class _Appender:
    """`Session.append_stream`'s request side, on gRPC's thread: it pulls the caller's
    pieces while the window has room; the caller's thread reads the answers (the plan)."""

    def __init__(self, stream: AppendStream, messages: Iterator[pb.Input]) -> None:
        self.stream = stream
        self.messages = messages
        self.cond = threading.Condition()
        self.pull_lock = threading.Lock()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _until(self, done: Callable[[], bool]) -> None:
        with self.cond:
            while not done():
                self.cond.wait(0.1)

    def requests(self, attempt: Attempt) -> Iterator[pb.StreamRequest]:
        yield attempt.first
        self._until(lambda: attempt.opened or attempt.ended)
        yield from self.stream.resends(attempt)
        while True:
            self._until(lambda: self.stream.may_send(attempt))
            if not self.stream.wants_piece(attempt):
                return
            # The caller's iterator may block: one puller at a time (an attempt that
            # ended may still be pulling), and nothing held that the answers need.
            with self.pull_lock:
                message = self.stream.carried_piece() or next(self.messages, None)
                request = self.stream.take(attempt, message)
            if request is None:
                return
            yield request
