"""What the blocking and the asyncio clients share: their arguments, the channel's
options and credentials, the stubs, the bearer token and the retry policy."""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional, Tuple, TypeVar, Union

import grpc
from grpc_health.v1 import health_pb2_grpc

from likeness.retry import DEFAULT_RETRY, Retry
from likeness.v1 import likeness_pb2_grpc as rpc

# The daemon's default limit is 64 MiB per message; the client matches it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

PemSource = Union[str, os.PathLike, bytes]

C = TypeVar("C", bound="BaseClient")


def _pem(source: Optional[PemSource]) -> Optional[bytes]:
    """PEM bytes as given, or read from a path."""
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


class BaseClient:
    """What both clients share; each adds its way of running calls."""

    # The module whose insecure_channel and secure_channel open the channel.
    _channels: Any = grpc

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: Optional[float] = None,
        channel: Any = None,
        tls_ca: Optional[PemSource] = None,
        tls_cert: Optional[PemSource] = None,
        tls_key: Optional[PemSource] = None,
        token: Optional[str] = None,
        retry: Optional[Retry] = DEFAULT_RETRY,
    ):
        """Connects to the daemon at `address` ("host:port"; an ``http://`` or
        ``https://`` prefix is dropped). The channel is opened on the first call.

        tls_ca: the CA that signed the daemon's certificate (a path or PEM bytes); it,
        or an ``https://`` address (then the system's roots), makes the channel TLS.
        tls_cert, tls_key: a client certificate (mutual TLS). token: sent as
        ``authorization: Bearer TOKEN`` with every call. channel: one of your own
        instead. timeout: seconds for each attempt of a unary call. retry: a Retry
        (None: never retry); by default reads that failed with UNAVAILABLE or
        RESOURCE_EXHAUSTED are tried up to 4 times.
        """
        tls = tls_ca is not None or address.startswith("https://")
        for scheme in ("http://", "https://"):
            if address.startswith(scheme):
                address = address[len(scheme) :]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls_cert is not None and not tls:
            raise ValueError("a client certificate needs TLS: give tls_ca too")
        self.address = address
        self.timeout = timeout
        self.retry = retry
        if channel is None:
            options = [
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ]
            if tls:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_pem(tls_ca),
                    private_key=_pem(tls_key),
                    certificate_chain=_pem(tls_cert),
                )
                channel = self._channels.secure_channel(address, credentials, options=options)
            else:
                channel = self._channels.insecure_channel(address, options=options)
        self._channel = channel
        # Metadata on every call rather than call credentials, which gRPC sends only over
        # TLS: a daemon behind a TLS-terminating proxy sees plaintext and still wants it.
        self._metadata: Optional[Tuple[Tuple[str, str], ...]] = (
            (("authorization", f"Bearer {token}"),) if token is not None else None
        )
        self._stubs = {
            "collections": rpc.CollectionsStub(channel),
            "items": rpc.ItemsStub(channel),
            "embedder": rpc.EmbedderStub(channel),
            "models": rpc.ModelsStub(channel),
            "miner": rpc.MinerStub(channel),
            "health": health_pb2_grpc.HealthStub(channel),
        }

    def with_retry(self: C, retry: Optional[Retry]) -> C:
        """This client with another retry policy, sharing its channel (closing either
        closes both): ``c.with_retry(Retry(writes=True)).upsert(...)`` retries one write."""
        other = copy.copy(self)
        other.retry = retry
        return other

    def _method(self, service: str, method: str) -> Any:
        return getattr(self._stubs[service], method)

    def _attempt(self, call: Any) -> Tuple[Any, Any, Dict[str, Any]]:
        """What one attempt of an _ops.Call sends: the stub's method, the request, and
        the call's options."""
        timeout = self.timeout if call.timeout is None else call.timeout
        options = {"timeout": timeout, "metadata": self._metadata}
        return self._method(call.service, call.method), call.message(), options
