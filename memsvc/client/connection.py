"""How the SDK reaches a server: channel options, TLS credentials, the API key metadata."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from memsvc.wire import AUTHORIZATION_METADATA, BEARER_PREFIX

DEFAULT_MAX_MESSAGE_BYTES = 4 << 20


@dataclass(frozen=True)
class Connection:
    """Where and as whom to connect.

    tls: use TLS (with the system's roots, or root_certificates PEM bytes when
    the server's certificate is self-signed or from a private CA).
    """

    address: str
    api_key: str
    tls: bool = False
    root_certificates: bytes | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_METADATA, f"{BEARER_PREFIX}{self.api_key}"),)

    @property
    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls and self.root_certificates is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    @property
    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # Pings keep an idle stream open through proxies and detect a dead server.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=self.options)
        return grpc.secure_channel(self.address, self.credentials, options=self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.address, options=self.options)
        return grpc.aio.secure_channel(self.address, self.credentials, options=self.options)
