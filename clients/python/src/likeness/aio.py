"""The asyncio client: `likeness.Client`'s methods, on a grpc.aio channel.

    import likeness.aio

    async with likeness.aio.Client("127.0.0.1:50051") as c:
        await c.wait_ready()
        hits = await c.search("faces", vector, k=5)
        async for batch in c.mine_triplets("faces", "semi_hard", margin=0.2):
            ...
        async with c.session("faces", "hard") as s:
            b = await s.step(ids, vectors)

Every method takes the same arguments and returns the same types as the blocking
client's, awaited. The mining streams are async iterators (``async for``, ``async
with``); a Session is an async context manager whose `step` and `close` are awaited.
Open the client inside the event loop that uses it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Type, TypeVar

import grpc
import grpc.aio

from likeness import _ops as ops
from likeness._base import BaseClient
from likeness._signature import copy_signature, like
from likeness.errors import from_rpc_error, translated
from likeness.mining import (
    ClassBatch,
    ClassRows,
    MineOptions,
    PairBatch,
    PairRows,
    SessionBase,
    StreamBase,
    TripletBatch,
    TripletRows,
)
from likeness.retry import Retry

if TYPE_CHECKING:
    from typing_extensions import Concatenate, ParamSpec

    P = ParamSpec("P")

T = TypeVar("T")
S = TypeVar("S", bound=StreamBase)

__all__ = [
    "Client",
    "Session",
    "TripletStream",
    "PairStream",
    "ClassBatchStream",
    "MineOptions",
    "Retry",
]


class _Stream(StreamBase):
    """A server stream: ``async for`` its batches; `stats` is set once it has ended."""

    async def _batches(self) -> AsyncIterator[Any]:
        with translated():
            async for msg in self._call:
                for batch in self._take(msg):
                    yield batch
                if msg.last:
                    return

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.cancel()


class TripletStream(TripletRows, _Stream):
    """MineTriplets: an async iterator of TripletBatch."""

    def __aiter__(self) -> AsyncIterator[TripletBatch]:
        return self._batches()


class PairStream(PairRows, _Stream):
    """MinePairs: an async iterator of PairBatch."""

    def __aiter__(self) -> AsyncIterator[PairBatch]:
        return self._batches()


class ClassBatchStream(ClassRows, _Stream):
    """MineBatches: an async iterator of ClassBatch."""

    def __aiter__(self) -> AsyncIterator[ClassBatch]:
        return self._batches()


class Session(SessionBase):
    """likeness.Session on asyncio: ``async with``, and ``await s.step(...)`` once per
    training step; `update` as there. Steps run one at a time."""

    def __init__(self, call: Any, collection: str, strategy: Any, options: MineOptions):
        super().__init__(collection, strategy, options)
        self._call = call
        self._lock = asyncio.Lock()

    @like(SessionBase._message, TripletBatch)
    async def step(self, *args: Any, **kwargs: Any) -> TripletBatch:
        async with self._lock:
            msg = self._message(*args, **kwargs)
            try:
                await self._call.write(msg)
                answer = await self._call.read()
            except grpc.RpcError as e:
                answer = e
            return self._answer(None if answer is grpc.aio.EOF else answer)

    async def close(self) -> None:
        """Ends the session once the daemon has answered (and written back) every step."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                await self._call.done_writing()
                while await self._call.read() is not grpc.aio.EOF:
                    pass
            except grpc.RpcError:
                pass

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _awaitable(
    op: "Callable[P, ops.Op[T]]",
) -> "Callable[Concatenate[Client, P], Awaitable[T]]":
    """An asyncio Client method that runs the operation `op`."""

    async def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        return await self._run(op(*args, **kwargs))

    return copy_signature(method, op, ops.result_type(op), "Client")


def _async_stream(
    op: "Callable[P, ops.MineCall]", stream: Type[S]
) -> "Callable[Concatenate[Client, P], S]":
    """An asyncio Client method that opens the mining stream `op` describes."""

    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        call = op(*args, **kwargs)
        rpc = self._method("miner", call.method)
        return stream(rpc(call.request, metadata=self._metadata))

    return copy_signature(method, op, stream, "Client")


def _async_session(
    op: "Callable[P, ops.SessionCall]",
) -> "Callable[Concatenate[Client, P], Session]":
    """An asyncio Client method that starts the Session `op` describes."""

    def method(self: Client, *args: Any, **kwargs: Any) -> Session:
        s = op(*args, **kwargs)
        call = self._method("miner", "Session")(metadata=self._metadata)
        return Session(call, s.collection, s.strategy, s.options)

    return copy_signature(method, op, Session, "Client")


class Client(BaseClient):
    """An asyncio client of one likeness daemon (arguments: see __init__), on
    grpc.aio: ``async with likeness.aio.Client(address) as c: await c.search(...)``."""

    _channels = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _run(self, op: ops.Op[T]) -> T:
        op = ops.retrying(op, self.retry)
        step = ops.advance(op, None)
        while not isinstance(step, ops.Done):
            step = ops.advance(op, await self._perform(step))
        return step.value

    async def _perform(self, step: Any) -> Any:
        """Waits out a Sleep, or makes one attempt of a Call: its reply or LikenessError."""
        if isinstance(step, ops.Sleep):
            return await asyncio.sleep(step.seconds)
        method, request, options = self._attempt(step)
        try:
            return await method(request, **options)
        except grpc.RpcError as e:
            return from_rpc_error(e)

    # -- readiness -------------------------------------------------------------------
    serving = _awaitable(ops.serving)
    wait_ready = _awaitable(ops.wait_ready)

    # -- collections -----------------------------------------------------------------
    create_collection = _awaitable(ops.create_collection)
    get_collection = _awaitable(ops.get_collection)
    list_collections = _awaitable(ops.list_collections)
    delete_collection = _awaitable(ops.delete_collection)

    # -- items -----------------------------------------------------------------------
    upsert = _awaitable(ops.upsert)
    get = _awaitable(ops.get)
    delete = _awaitable(ops.delete)
    search = _awaitable(ops.search)
    search_batch = _awaitable(ops.search_batch)
    classify = _awaitable(ops.classify)
    verify = _awaitable(ops.verify)
    calibrate = _awaitable(ops.calibrate)

    # -- models ----------------------------------------------------------------------
    embed = _awaitable(ops.embed)
    list_models = _awaitable(ops.list_models)
    get_model = _awaitable(ops.get_model)
    publish = _awaitable(ops.publish)
    activate = _awaitable(ops.activate)
    wait_activation = _awaitable(ops.wait_activation)

    # -- mining ----------------------------------------------------------------------
    mine_triplets = _async_stream(ops.mine_triplets, TripletStream)
    mine_pairs = _async_stream(ops.mine_pairs, PairStream)
    mine_batches = _async_stream(ops.mine_batches, ClassBatchStream)
    session = _async_session(ops.session)
