"""Retries (likeness.Retry), both clients, against an in-process gRPC server whose
methods fail their first calls with a chosen code, then answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import likeness
import likeness.aio
from likeness.v1 import likeness_pb2 as pb

FAST = likeness.Retry(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)


class Flaky:
    """Items.Search, Items.Upsert, Items.UpsertStream and Collections.CreateCollection
    on 127.0.0.1:0: each fails its first `failures` calls with `code`. Health: the
    standard servicer."""

    def __init__(self):
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.calls: Counter = Counter()
        self.tokens: list = []
        self._lock = threading.Lock()
        items = {
            "Search": grpc.unary_unary_rpc_method_handler(
                self._flaky("Search", self._search),
                pb.SearchRequest.FromString,
                pb.SearchResponse.SerializeToString,
            ),
            "Upsert": grpc.unary_unary_rpc_method_handler(
                self._flaky("Upsert", lambda r: pb.UpsertResponse(upserted=len(r.items))),
                pb.UpsertRequest.FromString,
                pb.UpsertResponse.SerializeToString,
            ),
            "UpsertStream": grpc.stream_unary_rpc_method_handler(
                self._flaky(
                    "UpsertStream",
                    lambda rs: pb.UpsertResponse(upserted=sum(len(r.items) for r in rs)),
                ),
                pb.UpsertRequest.FromString,
                pb.UpsertResponse.SerializeToString,
            ),
        }
        collections = {
            "CreateCollection": grpc.unary_unary_rpc_method_handler(
                self._flaky("CreateCollection", lambda r: pb.CollectionInfo(name=r.name)),
                pb.CreateCollectionRequest.FromString,
                pb.CollectionInfo.SerializeToString,
            )
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("likeness.v1.Items", items),
                grpc.method_handlers_generic_handler("likeness.v1.Collections", collections),
            )
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def reset(self, failures: int, code=grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures, self.code = failures, code
        self.calls.clear()
        self.tokens.clear()

    @staticmethod
    def _search(request):
        hit = pb.Hit(id="a", label="x", distance=0.25)
        return pb.SearchResponse(hits=[hit] * request.k)

    def _flaky(self, method, answer):
        def handle(request, context):
            with self._lock:
                self.calls[method] += 1
                failing = self.calls[method] <= self.failures
                self.tokens.append(dict(context.invocation_metadata()).get("authorization"))
            if failing:
                context.abort(self.code, f"{method} fails on purpose")
            return answer(request)

        return handle


@pytest.fixture(scope="module")
def flaky():
    f = Flaky()
    yield f
    f.server.stop(None)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retries_reads_until_they_succeed(flaky, code):
    flaky.reset(2, code)
    with likeness.Client(flaky.address, retry=FAST, token="t0k") as c:
        r = c.search("c", [1.0, 0.0], k=3)
    assert r.ids == ["a"] * 3 and flaky.calls["Search"] == 3
    assert flaky.tokens == ["Bearer t0k"] * 3, "every attempt carries the token"


def test_retries_stop_at_max_attempts_and_spare_other_codes(flaky):
    flaky.reset(100)
    with likeness.Client(flaky.address, retry=FAST) as c:
        with pytest.raises(likeness.Unavailable, match="fails on purpose"):
            c.search("c", [1.0], k=1)
        assert flaky.calls["Search"] == FAST.max_attempts

        flaky.reset(1, grpc.StatusCode.INVALID_ARGUMENT)
        with pytest.raises(likeness.InvalidArgument):
            c.search("c", [1.0], k=1)
        assert flaky.calls["Search"] == 1

    flaky.reset(1)
    with likeness.Client(flaky.address, retry=None) as c:
        with pytest.raises(likeness.Unavailable):
            c.search("c", [1.0], k=1)
    assert flaky.calls["Search"] == 1


def test_writes_are_retried_only_when_asked(flaky):
    vectors = np.ones((5, 2), dtype=np.float32)
    ids = list("abcde")
    with likeness.Client(flaky.address, retry=FAST) as c:
        # Calls when the first attempt fails and is retried: the chunked upsert makes
        # three calls, one of them twice.
        for call, method, retried in (
            (lambda c: c.upsert("c", ids, vectors, batch_size=2), "Upsert", 4),
            (lambda c: c.upsert("c", ids, vectors, batch_size=2, atomic=True), "UpsertStream", 2),
            (lambda c: c.create_collection("c", 2), "CreateCollection", 2),
        ):
            flaky.reset(1)
            with pytest.raises(likeness.Unavailable):
                call(c)
            assert flaky.calls[method] == 1, f"{method} is not retried by default"

            flaky.reset(1)
            call(c.with_retry(likeness.Retry(writes=True, initial_backoff=0.01)))
            assert flaky.calls[method] == retried, f"{method} is retried with writes=True"

        # A retried client stream sends every chunk again.
        flaky.reset(1)
        writes = c.with_retry(likeness.Retry(writes=True, initial_backoff=0.01))
        assert writes.upsert("c", ids, vectors, batch_size=2, atomic=True) == 5
        assert c.retry is FAST, "with_retry leaves the client as it was"

    with likeness.Client(
        flaky.address, retry=likeness.Retry(writes=True, initial_backoff=0.01)
    ) as c:
        flaky.reset(2)
        assert c.upsert("c", ids, vectors, batch_size=10) == 5
        assert flaky.calls["Upsert"] == 3


def test_backoff_is_exponential_capped_and_jittered(flaky):
    r = likeness.Retry(initial_backoff=0.1, multiplier=2, max_backoff=0.5, jitter=0.25)
    for attempt, wait in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        waits = [r.backoff(attempt) for _ in range(200)]
        assert wait * 0.75 <= min(waits) and max(waits) <= wait
        assert max(waits) - min(waits) > 0.01, "jittered"
    assert likeness.Retry(jitter=0).backoff(3) == pytest.approx(0.4)
    assert r.pause(grpc.StatusCode.NOT_FOUND, 1, write=False) is None
    assert r.pause(grpc.StatusCode.UNAVAILABLE, 1, write=True) is None
    assert r.pause(grpc.StatusCode.UNAVAILABLE, r.max_attempts, write=False) is None
    with pytest.raises(ValueError):
        likeness.Retry(max_attempts=0)

    # The client really waits: 0.05 + 0.1 + 0.2 s before the fourth attempt.
    flaky.reset(3)
    exact = likeness.Retry(initial_backoff=0.05, multiplier=2, jitter=0)
    with likeness.Client(flaky.address, retry=exact) as c:
        start = time.monotonic()
        c.search("c", [1.0], k=1)
        assert 0.35 <= time.monotonic() - start < 2
    assert flaky.calls["Search"] == 4


def test_aio_retries_reads_and_not_writes(flaky):
    async def main():
        async with likeness.aio.Client(flaky.address, retry=FAST, token="t0k") as c:
            flaky.reset(2, grpc.StatusCode.RESOURCE_EXHAUSTED)
            r = await c.search("c", [1.0], k=2)
            assert r.ids == ["a", "a"] and flaky.calls["Search"] == 3
            assert flaky.tokens == ["Bearer t0k"] * 3

            flaky.reset(100)
            with pytest.raises(likeness.Unavailable):
                await c.search("c", [1.0], k=1)
            assert flaky.calls["Search"] == FAST.max_attempts

            # It waits between attempts: 0.05 + 0.1 s.
            flaky.reset(2)
            exact = c.with_retry(likeness.Retry(initial_backoff=0.05, multiplier=2, jitter=0))
            start = time.monotonic()
            await exact.search("c", [1.0], k=1)
            assert 0.15 <= time.monotonic() - start < 2

            flaky.reset(1)
            with pytest.raises(likeness.Unavailable):
                await c.upsert("c", ["a"], [[1.0]])
            assert flaky.calls["Upsert"] == 1

            flaky.reset(1)
            writes = c.with_retry(likeness.Retry(writes=True, initial_backoff=0.01))
            assert await writes.upsert("c", ["a", "b"], [[1.0], [2.0]], atomic=True) == 2
            assert flaky.calls["UpsertStream"] == 2

    asyncio.run(main())


def test_serving_reads_the_health_status(flaky):
    flaky.health.set("likeness.v1.Items", health_pb2.HealthCheckResponse.NOT_SERVING)
    with likeness.Client(flaky.address, retry=None) as c:
        assert not c.serving()
        with pytest.raises(TimeoutError, match="not SERVING"):
            c.wait_ready(0.2)
        flaky.health.set("likeness.v1.Items", health_pb2.HealthCheckResponse.SERVING)
        assert c.serving() and not c.serving("likeness.v1.Miner")  # unknown: NOT_FOUND
        c.wait_ready(1)

    async def main():
        async with likeness.aio.Client(flaky.address, retry=None) as c:
            assert await c.serving()
            flaky.health.set("likeness.v1.Items", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert not await c.serving()

    asyncio.run(main())
