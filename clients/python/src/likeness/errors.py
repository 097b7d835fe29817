"""Errors: every failed call raises a LikenessError carrying the gRPC status.

The daemon names the offending field in its message (``items[3].vector[7]: ...``), so
``str(error)`` is usually enough to fix the call. Subclasses exist for the codes a
caller may want to catch on their own; anything else is a plain LikenessError.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Type

import grpc

__all__ = [
    "LikenessError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "Internal",
]


class LikenessError(Exception):
    """A call the daemon (or the channel) refused.

    Attributes:
        code: the ``grpc.StatusCode``.
        message: the status message; for bad input it names the field.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(LikenessError):
    """INVALID_ARGUMENT: the message names the field and, for items, the item."""


class NotFound(LikenessError):
    """NOT_FOUND: an unknown collection or model."""


class AlreadyExists(LikenessError):
    """ALREADY_EXISTS: a collection name that is taken."""


class ResourceExhausted(LikenessError):
    """RESOURCE_EXHAUSTED: an oversize message or a full queue; retry later or smaller."""


class Unavailable(LikenessError):
    """UNAVAILABLE: no daemon at the address, or it is shutting down."""


class DeadlineExceeded(LikenessError):
    """DEADLINE_EXCEEDED: the call's timeout ran out."""


class Cancelled(LikenessError):
    """CANCELLED: the call was cancelled (for example a stream closed early)."""


class Internal(LikenessError):
    """INTERNAL: the daemon failed; its log has the detail under the request id."""


_BY_CODE: Dict[grpc.StatusCode, Type[LikenessError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}


def from_rpc_error(e: grpc.RpcError) -> LikenessError:
    """The LikenessError for a grpc.RpcError (a grpc.Call carries code and details)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return _BY_CODE.get(code, LikenessError)(code, details or "")


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Re-raises a grpc.RpcError from the block as the matching LikenessError."""
    try:
        yield
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
