"""The blocking client: one gRPC channel to a likeness daemon, one method per RPC.

The methods are the operations of likeness._ops, run here on a blocking channel (and in
likeness.aio on an asyncio one), so the two clients cannot drift apart.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Type, TypeVar

import grpc

from likeness import _ops as ops
from likeness._base import MAX_MESSAGE_BYTES, BaseClient, PemSource
from likeness._signature import copy_signature
from likeness.errors import from_rpc_error
from likeness.mining import ClassBatchStream, PairStream, Session, StreamBase, TripletStream

if TYPE_CHECKING:
    from typing_extensions import Concatenate, ParamSpec

    P = ParamSpec("P")

T = TypeVar("T")
S = TypeVar("S", bound=StreamBase)

__all__ = ["Client", "MAX_MESSAGE_BYTES", "PemSource"]


def _blocking(op: "Callable[P, ops.Op[T]]") -> "Callable[Concatenate[Client, P], T]":
    """A Client method that runs the operation `op`."""

    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        return self._run(op(*args, **kwargs))

    return copy_signature(method, op, ops.result_type(op), "Client")


def _opens(
    op: "Callable[P, ops.MineCall]", stream: Type[S]
) -> "Callable[Concatenate[Client, P], S]":
    """A Client method that opens the mining stream `op` describes."""

    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        call = op(*args, **kwargs)
        miner = self._method("miner", call.method)
        return stream(miner(call.request, metadata=self._metadata))

    return copy_signature(method, op, stream, "Client")


def _starts(op: "Callable[P, ops.SessionCall]") -> "Callable[Concatenate[Client, P], Session]":
    """A Client method that starts the Session `op` describes."""

    def method(self: Client, *args: Any, **kwargs: Any) -> Session:
        s = op(*args, **kwargs)
        opener = self._method("miner", "Session")
        return Session(
            lambda requests: opener(requests, metadata=self._metadata),
            s.collection,
            s.strategy,
            s.options,
        )

    return copy_signature(method, op, Session, "Client")


class Client(BaseClient):
    """A blocking client of one likeness daemon (arguments: see __init__). It is
    thread-safe; close it, or use it as a context manager."""

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, op: ops.Op[T]) -> T:
        op = ops.retrying(op, self.retry)
        step = ops.advance(op, None)
        while not isinstance(step, ops.Done):
            step = ops.advance(op, self._perform(step))
        return step.value

    def _perform(self, step: Any) -> Any:
        """Waits out a Sleep, or makes one attempt of a Call: its reply or LikenessError."""
        if isinstance(step, ops.Sleep):
            return time.sleep(step.seconds)
        method, request, options = self._attempt(step)
        try:
            return method(request, **options)
        except grpc.RpcError as e:
            return from_rpc_error(e)

    # -- readiness -------------------------------------------------------------------
    serving = _blocking(ops.serving)
    wait_ready = _blocking(ops.wait_ready)

    # -- collections -----------------------------------------------------------------
    create_collection = _blocking(ops.create_collection)
    get_collection = _blocking(ops.get_collection)
    list_collections = _blocking(ops.list_collections)
    delete_collection = _blocking(ops.delete_collection)

    # -- items -----------------------------------------------------------------------
    upsert = _blocking(ops.upsert)
    get = _blocking(ops.get)
    delete = _blocking(ops.delete)
    search = _blocking(ops.search)
    search_batch = _blocking(ops.search_batch)
    classify = _blocking(ops.classify)
    verify = _blocking(ops.verify)
    calibrate = _blocking(ops.calibrate)

    # -- models ----------------------------------------------------------------------
    embed = _blocking(ops.embed)
    list_models = _blocking(ops.list_models)
    get_model = _blocking(ops.get_model)
    publish = _blocking(ops.publish)
    activate = _blocking(ops.activate)
    wait_activation = _blocking(ops.wait_activation)

    # -- mining ----------------------------------------------------------------------
    mine_triplets = _opens(ops.mine_triplets, TripletStream)
    mine_pairs = _opens(ops.mine_pairs, PairStream)
    mine_batches = _opens(ops.mine_batches, ClassBatchStream)

    session = _starts(ops.session)
