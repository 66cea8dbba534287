"""`memsvc serve` as a child process: the demo, `memsvc bench serve` and the tests run
the real server this way, so restarts and crashes are real process exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A port that was free a moment ago on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One `memsvc serve` child on 127.0.0.1:port; args are the serve flags besides --address
    (/metrics is off unless args pass --metrics-port: children must not fight over one port).

    Its log lines go to `log_path` (appended to across restarts). Use it in a
    `with` block: a server still running at its end is killed."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_level: str = "info",
    ) -> None:
        self.args = list(args)
        self.log_level = log_level
        self.log_path = log_path
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {})}
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0  # where this start's lines begin in log_path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        """Starts the server and returns once its health check says SERVING."""
        command = [sys.executable, "-m", "memsvc.cli", "--log-json", "--log-level", self.log_level]
        command.append("serve")
        command += ["--address", self.address, "--metrics-port", "0", *self.args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()
        self._process = subprocess.Popen(command, stdout=self._log, stderr=self._log, env=self.env)
        self._wait_serving(timeout_s)
        return self

    def wait_for_event(self, events: tuple[str, ...], timeout_s: float) -> str | None:
        """Waits until a log line of this start has one of `events` as its event and
        returns it; None once `timeout_s` passed or the server exited without one."""
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                for line in log:
                    try:
                        event = json.loads(line).get("event")
                    except ValueError:
                        continue
                    if event in events:
                        return event
            if time.monotonic() > deadline or self._process.poll() is not None:
                return None
            time.sleep(0.1)

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM (the graceful stop) and wait; returns the exit code."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        return self._wait(timeout_s)

    def kill(self) -> int:
        """SIGKILL: a crash, with no chance to checkpoint."""
        assert self._process is not None
        self._process.kill()
        return self._wait(30.0)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaves no server behind: one still running (a failure on the way) is killed."""
        if self._process is not None and self._process.poll() is None:
            self.kill()

    def _wait(self, timeout_s: float) -> int:
        assert self._process is not None and self._log is not None
        try:
            return self._process.wait(timeout_s)
        finally:
            self._log.close()

    def _wait_serving(self, timeout_s: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"memsvc serve exited with {self._process.returncode} while starting; "
                        f"see {self.log_path}"
                    )
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"memsvc serve did not start in {timeout_s} s")
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
