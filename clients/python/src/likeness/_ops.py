"""Each client method once, free of I/O, for the blocking and the asyncio client alike.

An operation is a generator: it builds the requests, yields a `Call` (or a `Sleep`) for
each RPC it needs, is sent the reply (or thrown the LikenessError), and returns the
method's result. `likeness.Client` runs operations on a blocking channel,
`likeness.aio.Client` on an asyncio one; both retry a Call as their Retry says. The
mining methods return a `MineCall` or a `SessionCall` instead, which each client opens
as its own kind of stream or Session.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Generator,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    get_args,
    get_type_hints,
)

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from likeness import _convert as cv
from likeness.errors import LikenessError
from likeness.retry import Retry
from likeness.mining import BatchOptions, MineOptions, batch_request, merge_options, mine_request
from likeness.types import (
    BatchSearchResult,
    Calibration,
    Classification,
    CollectionInfo,
    Items,
    ModelInfo,
    SearchResult,
    Verification,
)
from likeness.v1 import likeness_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One unary or client-streaming RPC."""

    service: str  # "collections", "items", "embedder", "models" or "health"
    method: str  # as the proto names it
    # The request; for a client stream, a function that gives the messages (called again
    # for each attempt).
    request: Any
    write: bool = False  # retried only when the Retry allows writes
    timeout: Optional[float] = None  # None: the client's

    def message(self) -> Any:
        return self.request() if callable(self.request) else self.request


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Done:
    value: Any


Op = Generator[Union[Call, Sleep], Any, T]


def advance(op: Op[Any], outcome: Any) -> Union[Call, Sleep, Done]:
    """Sends the last call's reply into the operation (or throws its error) and returns
    what it asks for next, or Done with its result."""
    try:
        if isinstance(outcome, BaseException):
            return op.throw(outcome)
        return op.send(outcome)
    except StopIteration as done:
        return Done(done.value)


def retrying(op: Op[T], policy: Optional[Retry]) -> Op[T]:
    """`op` with each Call it yields tried again as `policy` says (None: never): the
    failed attempts stay here, and the waits between them are yielded as Sleeps."""
    outcome: Any = None
    while True:
        step = advance(op, outcome)
        if isinstance(step, Done):
            return step.value
        if isinstance(step, Sleep):
            outcome = yield step
            continue
        attempt = 1
        while True:
            try:
                outcome = yield step
                break
            except LikenessError as e:
                pause = policy.pause(e.code, attempt, step.write) if policy else None
                if pause is None:
                    outcome = e
                    break
            yield Sleep(pause)
            attempt += 1


def result_type(op: Callable[..., Any]) -> Any:
    """T of an operation annotated ``-> Op[T]``."""
    return get_args(get_type_hints(op)["return"])[2]


# -- readiness -----------------------------------------------------------------------


def serving(service: str = "likeness.v1.Items") -> Op[bool]:
    """Whether the daemon reports `service` SERVING (grpc.health.v1)."""
    req = health_pb2.HealthCheckRequest(service=service)
    try:
        r = yield Call("health", "Check", req, timeout=5)
    except LikenessError:
        return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


def wait_ready(timeout: float = 30.0, service: str = "likeness.v1.Items") -> Op[None]:
    """Waits until `service` is SERVING (the core has recovered); raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while not (yield from serving(service)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service} not SERVING after {timeout} s")
        yield Sleep(0.05)


# -- collections ---------------------------------------------------------------------


def create_collection(
    name: str,
    dimension: int = 0,
    metric: Union[str, int, None] = None,
    *,
    model: str = "",
    pair_model: str = "",
    precision: Union[str, int, None] = None,
    keep_inputs: Optional[bool] = None,
    connectivity: int = 0,
    expansion_add: int = 0,
    expansion_search: int = 0,
) -> Op[CollectionInfo]:
    """Creates a collection. metric: "cosine" (default), "l2" or "inner_product";
    precision: "f32" (default), "f16" or "i8". With a model, dimension and metric
    may be left out (the model's)."""
    req = pb.CreateCollectionRequest(
        name=name,
        dimension=dimension,
        metric=cv.enum(metric, cv.METRICS, "metric"),
        precision=cv.enum(precision, cv.PRECISIONS, "precision"),
        model=model,
        pair_model=pair_model,
        index=pb.IndexParams(
            connectivity=connectivity,
            expansion_add=expansion_add,
            expansion_search=expansion_search,
        ),
    )
    if keep_inputs is not None:
        req.keep_inputs = keep_inputs
    r = yield Call("collections", "CreateCollection", req, write=True)
    return CollectionInfo.from_pb(r)


def get_collection(name: str) -> Op[CollectionInfo]:
    r = yield Call("collections", "GetCollection", pb.GetCollectionRequest(name=name))
    return CollectionInfo.from_pb(r)


def list_collections() -> Op[List[CollectionInfo]]:
    r = yield Call("collections", "ListCollections", pb.ListCollectionsRequest())
    return [CollectionInfo.from_pb(c) for c in r.collections]


def delete_collection(name: str) -> Op[int]:
    """Deletes a collection; returns how many items it held."""
    req = pb.DeleteCollectionRequest(name=name)
    r = yield Call("collections", "DeleteCollection", req, write=True)
    return r.deleted


# -- items ---------------------------------------------------------------------------


def upsert(
    collection: str,
    ids: Sequence[str],
    vectors: Any = None,
    *,
    labels: Optional[Sequence[str]] = None,
    metadata: Optional[Sequence[Mapping[str, str]]] = None,
    inputs: Optional[Sequence[Any]] = None,
    generation: Union[int, Sequence[int]] = 0,
    batch_size: int = 1000,
    atomic: bool = False,
    progress: bool = False,
) -> Op[int]:
    """Inserts or replaces items; returns how many were upserted.

    vectors: (n, d) array-like (float32 on the wire). inputs: for a model-backed
    collection, one input per item instead of (or beside) vectors: encoded image
    bytes, a PIL image or a numpy tensor. labels, metadata: one per item.
    generation: one for all, or one per item.

    The items go in chunks of `batch_size`, each durable when its call returns.
    With atomic=True they go as one UpsertStream: all or nothing. progress=True shows
    a tqdm bar.
    """
    ids = list(ids)
    n = len(ids)
    if vectors is None and inputs is None:
        raise ValueError("give vectors, inputs, or both")
    m = cv.matrix(vectors, "vectors") if vectors is not None else None
    for what, seq in (
        ("vectors", m),
        ("labels", labels),
        ("metadata", metadata),
        ("inputs", inputs),
    ):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{len(seq)} {what} for {n} ids")
    gens = [int(generation)] * n if np.isscalar(generation) else [int(g) for g in generation]
    if len(gens) != n:
        raise ValueError(f"{len(gens)} generations for {n} ids")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")

    def chunk(start: int, end: int) -> pb.UpsertRequest:
        rows = m[start:end].tolist() if m is not None else None
        req = pb.UpsertRequest(collection=collection)
        for j in range(start, end):
            item = req.items.add(id=ids[j], generation=gens[j])
            if labels is not None:
                item.label = labels[j]
            if metadata is not None and metadata[j]:
                item.metadata.update(metadata[j])
            if rows is not None:
                item.vector.extend(rows[j - start])
            if inputs is not None and inputs[j] is not None:
                item.input.CopyFrom(cv.to_input(inputs[j]))
        return req

    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="item", desc=f"upsert {collection}")
    try:
        if atomic:

            def stream() -> Iterator[pb.UpsertRequest]:
                if bar is not None:
                    bar.reset()  # a retry sends everything again
                for start, end in bounds:
                    yield chunk(start, end)
                    if bar is not None:
                        bar.update(end - start)

            r = yield Call("items", "UpsertStream", stream, write=True)
            return r.upserted
        upserted = 0
        for start, end in bounds:
            r = yield Call("items", "Upsert", chunk(start, end), write=True)
            upserted += r.upserted
            if bar is not None:
                bar.update(end - start)
        return upserted
    finally:
        if bar is not None:
            bar.close()


def get(
    collection: str,
    ids: Sequence[str],
    *,
    with_vectors: bool = False,
    with_inputs: bool = False,
) -> Op[Items]:
    """The items with these ids, in request order; unknown ids are left out."""
    if isinstance(ids, str):
        ids = [ids]
    req = pb.GetRequest(
        collection=collection, ids=list(ids), with_vectors=with_vectors, with_inputs=with_inputs
    )
    r = yield Call("items", "Get", req)
    return Items.from_pb(r, with_vectors, with_inputs)


def delete(collection: str, ids: Sequence[str]) -> Op[int]:
    """Deletes items; returns how many of the ids existed."""
    if isinstance(ids, str):
        ids = [ids]
    req = pb.DeleteRequest(collection=collection, ids=list(ids))
    r = yield Call("items", "Delete", req, write=True)
    return r.deleted


def search(
    collection: str,
    query: Any,
    k: int = 10,
    *,
    labels: Optional[Sequence[str]] = None,
    exclude_labels: Optional[Sequence[str]] = None,
    metadata: Optional[Mapping[str, str]] = None,
    exact: bool = False,
    expansion: int = 0,
    with_vectors: bool = False,
    with_metadata: bool = False,
    rerank: int = 0,
) -> Op[SearchResult]:
    """The k nearest items to `query`: a vector (1-D array or list), a stored item's
    id (str), or an input for the collection's model (image bytes, a PIL image, or
    `likeness.tensor_input(...)`). Filters: any of `labels`, none of
    `exclude_labels`, all `metadata` entries equal."""
    req = pb.SearchRequest(
        collection=collection,
        query=cv.to_query(query),
        k=k,
        filter=cv.to_filter(labels, exclude_labels, metadata),
        exact=exact,
        expansion=expansion,
        with_vectors=with_vectors,
        with_metadata=with_metadata,
        rerank=rerank,
    )
    r = yield Call("items", "Search", req)
    return SearchResult.from_pb(r, with_vectors, with_metadata, rerank > 0)


def search_batch(
    collection: str,
    queries: Any,
    k: int = 10,
    *,
    labels: Optional[Sequence[str]] = None,
    exclude_labels: Optional[Sequence[str]] = None,
    metadata: Optional[Mapping[str, str]] = None,
    exact: bool = False,
    expansion: int = 0,
    with_vectors: bool = False,
    with_metadata: bool = False,
    rerank: int = 0,
) -> Op[BatchSearchResult]:
    """Many searches in one call: a (q, d) array of vectors, or a list of queries
    as `search` takes them. Returns (q, k) arrays (see BatchSearchResult)."""
    req = pb.SearchBatchRequest(
        collection=collection,
        queries=cv.to_queries(queries),
        k=k,
        filter=cv.to_filter(labels, exclude_labels, metadata),
        exact=exact,
        expansion=expansion,
        with_vectors=with_vectors,
        with_metadata=with_metadata,
        rerank=rerank,
    )
    r = yield Call("items", "SearchBatch", req)
    results = [SearchResult.from_pb(x, with_vectors, with_metadata, rerank > 0) for x in r.results]
    return BatchSearchResult.from_results(results, k)


def classify(collection: str, query: Any, k: int = 10) -> Op[Classification]:
    """Identification: a distance-weighted vote of the k nearest items' labels."""
    req = pb.ClassifyRequest(collection=collection, query=cv.to_query(query), k=k)
    r = yield Call("items", "Classify", req)
    return Classification.from_pb(r)


def verify(collection: str, a: Any, b: Any) -> Op[Verification]:
    """Verification: are a and b (each a query as `search` takes it) the same?"""
    req = pb.VerifyRequest(collection=collection, a=cv.to_query(a), b=cv.to_query(b))
    r = yield Call("items", "Verify", req)
    return Verification.from_pb(r)


def calibrate(collection: str, pairs: int = 0, seed: int = 0) -> Op[Calibration]:
    """Fits the logistic's margin and scale and the threshold on sampled labelled
    pairs, stores them in the collection, and reports how well they separate."""
    req = pb.CalibrateRequest(collection=collection, pairs=pairs, seed=seed)
    r = yield Call("items", "Calibrate", req, write=True)
    return Calibration.from_pb(r)


# -- models --------------------------------------------------------------------------


def embed(
    inputs: Any,
    model: str = "",
    *,
    tower: str = "",
    batch_size: int = 256,
) -> Op[np.ndarray]:
    """Embeds inputs with a model (default: the daemon's first embedder); returns
    an (n, d) float32 array in input order.

    inputs: a list of encoded images (bytes), PIL images or numpy tensors; or one
    numpy array whose first axis is the batch (each row a tensor). Calls go in
    chunks of batch_size.
    """
    if isinstance(inputs, np.ndarray):
        items = [cv.tensor_input(row, tower) for row in inputs]
    else:
        if isinstance(inputs, (bytes, bytearray)) or cv.is_pil_image(inputs):
            inputs = [inputs]
        items = [cv.to_input(x, tower) for x in inputs]
    if not model:
        embedders = [m for m in (yield from list_models()) if m.kind == "embedder"]
        if not embedders:
            raise LikenessError(grpc.StatusCode.NOT_FOUND, "the daemon has no embedder")
        model = sorted(m.name for m in embedders)[0]
    out: List[List[float]] = []
    for start in range(0, len(items), batch_size):
        req = pb.EmbedRequest(model=model, inputs=items[start : start + batch_size])
        r = yield Call("embedder", "Embed", req)
        out.extend(list(e.values) for e in r.embeddings)
    return cv.stack_vectors(out)


def list_models() -> Op[List[ModelInfo]]:
    r = yield Call("models", "ListModels", pb.ListModelsRequest())
    return [ModelInfo.from_pb(m) for m in r.models]


def get_model(name: str) -> Op[ModelInfo]:
    r = yield Call("models", "GetModel", pb.GetModelRequest(name=name))
    return ModelInfo.from_pb(r)


def _read_manifest(manifest: Union[str, os.PathLike]) -> Tuple[str, Optional[str]]:
    """A manifest's TOML and the folder it was read from (None for TOML text)."""
    if isinstance(manifest, os.PathLike) or (
        isinstance(manifest, str) and "\n" not in manifest and os.path.isfile(manifest)
    ):
        path = os.fspath(manifest)
        with open(path, encoding="utf-8") as f:
            return f.read(), os.path.dirname(os.path.abspath(path))
    return str(manifest), None


def _manifest_file(text: str) -> str:
    """The .onnx file a manifest's towers (or pair) name."""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "file":
            return value.strip().strip('"').strip("'")
    raise ValueError("the manifest names no file; give onnx=")


def publish(
    name: str,
    manifest: Union[str, os.PathLike],
    onnx: Union[bytes, str, os.PathLike, None] = None,
    chunk_bytes: int = 1 << 20,
) -> Op[ModelInfo]:
    """Publishes a new version of model `name` (Models.Publish). `manifest` is the
    TOML text or the path of a model.toml; `onnx` the .onnx bytes or path (default:
    the file the manifest's towers name, beside it). The manifest's `sha256` is set
    from the bytes when it has none. Returns the model as served, `NAME@VERSION`."""
    text, base = _read_manifest(manifest)
    if onnx is None:
        if base is None:
            raise ValueError("give onnx= when the manifest is text, not a path")
        onnx = os.path.join(base, _manifest_file(text))
    if isinstance(onnx, (bytes, bytearray)):
        data = bytes(onnx)
    else:
        with open(onnx, "rb") as f:
            data = f.read()
    if not any(line.strip().startswith("sha256") for line in text.splitlines()):
        text = f'sha256 = "{hashlib.sha256(data).hexdigest()}"\n' + text
    step = max(1, int(chunk_bytes))

    def chunks() -> Iterator[pb.ModelChunk]:
        yield pb.ModelChunk(name=name, manifest=text, bytes=data[:step])
        for start in range(step, len(data), step):
            yield pb.ModelChunk(bytes=data[start : start + step])

    r = yield Call("models", "Publish", chunks, write=True)
    return ModelInfo.from_pb(r)


def activate(collection: str, model: str, version: str = "") -> Op[CollectionInfo]:
    """Switches `collection` to `model` (version: a published one; "" = as loaded at
    start): its stored inputs are re-embedded in the background, and it keeps serving
    its current vectors until the switch. See `wait_activation`."""
    req = pb.ActivateRequest(collection=collection, model=model, version=version)
    r = yield Call("models", "Activate", req, write=True)
    return CollectionInfo.from_pb(r)


def wait_activation(
    collection: str, timeout: float = 600.0, poll: float = 0.2, progress: bool = False
) -> Op[CollectionInfo]:
    """Waits until the collection's activation is done; raises LikenessError when it
    failed and TimeoutError when `timeout` passes. `progress` shows a tqdm bar."""
    deadline = time.monotonic() + timeout
    bar = None
    try:
        while True:
            info = yield from get_collection(collection)
            a = info.activation
            if a is None:
                raise ValueError(f"collection {collection!r} has no activation")
            if progress:
                if bar is None:
                    from tqdm import tqdm

                    bar = tqdm(total=a.total, unit="item", desc=f"re-embedding {collection}")
                bar.total = a.total
                bar.n = a.done
                bar.refresh()
            if a.state == "done":
                return info
            if a.state == "failed":
                raise LikenessError(grpc.StatusCode.ABORTED, f"activation failed: {a.error}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"activation of {collection!r} at {a.done}/{a.total} after {timeout} s"
                )
            yield Sleep(poll)
    finally:
        if bar is not None:
            bar.close()


# -- mining --------------------------------------------------------------------------


@dataclass(frozen=True)
class MineCall:
    """A mining stream to open: Miner.<method>(request)."""

    method: str  # "MineTriplets", "MinePairs" or "MineBatches"
    request: Any


@dataclass(frozen=True)
class SessionCall:
    """A Session to open."""

    collection: str
    strategy: Any
    options: MineOptions


def mine_triplets(
    collection: str,
    strategy: Any = "semi_hard",
    options: Optional[MineOptions] = None,
    **overrides: Any,
) -> MineCall:
    """One pass of MineTriplets over the anchors: an iterator of TripletBatch; the
    stream's `stats` once it has ended. `options`: a MineOptions; its fields may also
    be given by name (margin=0.2, shard=(0, 2), ...), over `options`. An unknown name
    is a TypeError; a bad request raises when iteration starts."""
    return MineCall("MineTriplets", mine_request(collection, strategy, options, **overrides))


def mine_pairs(
    collection: str,
    strategy: Any = "semi_hard",
    options: Optional[MineOptions] = None,
    **overrides: Any,
) -> MineCall:
    """MinePairs: as mine_triplets, as labelled pairs (pos_margin, neg_margin)."""
    return MineCall("MinePairs", mine_request(collection, strategy, options, **overrides))


def mine_batches(
    collection: str, options: Optional[BatchOptions] = None, **overrides: Any
) -> MineCall:
    """MineBatches: P x K batches for an in-batch miner, an iterator of ClassBatch;
    the stream's `stats` once it has ended. `options`: a BatchOptions; its fields may
    also be given by name (classes=16, per_class=4, ...).

    Each batch is an anchor class, then `neighbours` classes (default: P - 1) taken
    from the labels of the anchor-class items' nearest negatives (`candidates` of
    them per item; 0: 32), then random classes; `per_class` items of each
    (`classes` = P, `per_class` = K). max_batches=0 is one pass: every item of the
    shard (index, count) at least once. A bad request raises when iteration starts.
    """
    return MineCall("MineBatches", batch_request(collection, options, **overrides))


def session(
    collection: str,
    strategy: Any = "semi_hard",
    options: Optional[MineOptions] = None,
    **overrides: Any,
) -> SessionCall:
    """A Session: call `step(ids, vectors)` once per training step (see Session);
    `step(..., write_back=True)` makes it a cross-batch memory. Options as
    mine_triplets'."""
    merged = merge_options(MineOptions, options, overrides)
    merged.request(collection, strategy)  # bad options fail here, not mid-stream
    return SessionCall(collection, strategy, merged)
