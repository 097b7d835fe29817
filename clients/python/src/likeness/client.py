"""The client: one gRPC channel to a likeness daemon, one method per RPC."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from likeness import _convert as cv
from likeness.errors import LikenessError, from_rpc_error, translate
from likeness.mining import (
    ClassBatch,
    ClassBatchStream,
    PairBatch,
    PairStream,
    Session,
    TripletBatch,
    TripletStream,
    batch_request,
    mine_request,
)
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
from likeness.v1 import likeness_pb2_grpc as rpc

# The daemon's default limit is 64 MiB per message; the client matches it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

PemSource = Union[str, "os.PathLike[str]", bytes]


def _pem(source: Optional[PemSource]) -> Optional[bytes]:
    """PEM bytes as given, or read from a path."""
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer TOKEN`` to every call, streams included. An
    interceptor rather than call credentials, which gRPC sends only over TLS: a daemon
    behind a TLS-terminating proxy sees plaintext and still wants the token."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


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


def _health_request(service: str) -> bytes:
    # grpc.health.v1.HealthCheckRequest{service}: field 1, length-delimited. Written by
    # hand so that readiness needs no extra package.
    data = service.encode("utf-8")
    n, varint = len(data), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        varint.append(byte | (0x80 if n else 0))
        if not n:
            break
    return b"\x0a" + bytes(varint) + data


def _health_status(data: bytes) -> int:
    # HealthCheckResponse{status}: field 1, varint; absent means UNKNOWN (0).
    return data[1] if len(data) >= 2 and data[0] == 0x08 else 0


class Client:
    """A client of one likeness daemon.

    ``Client("127.0.0.1:50051")`` opens an insecure channel. ``tls_ca`` (the CA that
    signed the daemon's certificate: a path or PEM bytes) or an ``https://`` address
    (then the system's roots) makes it TLS; ``tls_cert`` and ``tls_key`` present a
    client certificate (mutual TLS); ``token`` is sent as ``authorization: Bearer
    TOKEN`` with every call. Or pass ``channel=`` to use one of your own. ``timeout``
    (seconds) applies to every unary call. The client is thread-safe; close it, or use
    it as a context manager.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: Optional[float] = None,
        channel: Optional[grpc.Channel] = None,
        tls_ca: Optional[PemSource] = None,
        tls_cert: Optional[PemSource] = None,
        tls_key: Optional[PemSource] = None,
        token: Optional[str] = None,
    ):
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
                channel = grpc.secure_channel(address, credentials, options=options)
            else:
                channel = grpc.insecure_channel(address, options=options)
        # Closed through the underlying channel: an intercepted one has no close of its
        # own in older grpcio.
        self._base_channel = channel
        if token is not None:
            channel = grpc.intercept_channel(channel, _Bearer(token))
        self._channel = channel
        self._collections = rpc.CollectionsStub(self._channel)
        self._items = rpc.ItemsStub(self._channel)
        self._embedder = rpc.EmbedderStub(self._channel)
        self._models = rpc.ModelsStub(self._channel)
        self._miner = rpc.MinerStub(self._channel)
        self._health = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

    def close(self) -> None:
        self._base_channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- readiness -------------------------------------------------------------------

    def serving(self, service: str = "likeness.v1.Items") -> bool:
        """Whether the daemon reports `service` SERVING (grpc.health.v1)."""
        try:
            return _health_status(self._health(_health_request(service), timeout=5)) == 1
        except grpc.RpcError:
            return False

    def wait_ready(self, timeout: float = 30.0, service: str = "likeness.v1.Items") -> None:
        """Waits until `service` is SERVING (the core has recovered); raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self.serving(service):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} at {self.address} not SERVING after {timeout} s")
            time.sleep(0.05)

    # -- collections -----------------------------------------------------------------

    @translate
    def create_collection(
        self,
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
    ) -> CollectionInfo:
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
        return CollectionInfo.from_pb(self._collections.CreateCollection(req, timeout=self.timeout))

    @translate
    def get_collection(self, name: str) -> CollectionInfo:
        r = self._collections.GetCollection(
            pb.GetCollectionRequest(name=name), timeout=self.timeout
        )
        return CollectionInfo.from_pb(r)

    @translate
    def list_collections(self) -> List[CollectionInfo]:
        r = self._collections.ListCollections(pb.ListCollectionsRequest(), timeout=self.timeout)
        return [CollectionInfo.from_pb(c) for c in r.collections]

    @translate
    def delete_collection(self, name: str) -> int:
        """Deletes a collection; returns how many items it held."""
        r = self._collections.DeleteCollection(
            pb.DeleteCollectionRequest(name=name), timeout=self.timeout
        )
        return r.deleted

    # -- items -----------------------------------------------------------------------

    def upsert(
        self,
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
    ) -> int:
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
        if isinstance(labels, str):
            raise TypeError("labels is one label per item, not a string")
        gens = [int(generation)] * n if np.isscalar(generation) else [int(g) for g in generation]
        if len(gens) != n:
            raise ValueError(f"{len(gens)} generations for {n} ids")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="item", desc=f"upsert {collection}")

        def requests() -> Iterator[pb.UpsertRequest]:
            for start in range(0, n, batch_size):
                end = min(start + batch_size, n)
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
                yield req
                if bar is not None:
                    bar.update(end - start)

        try:
            if atomic:
                return self._items.UpsertStream(requests(), timeout=self.timeout).upserted
            return sum(self._items.Upsert(r, timeout=self.timeout).upserted for r in requests())
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            if bar is not None:
                bar.close()

    @translate
    def get(
        self,
        collection: str,
        ids: Sequence[str],
        *,
        with_vectors: bool = False,
        with_inputs: bool = False,
    ) -> Items:
        """The items with these ids, in request order; unknown ids are left out."""
        if isinstance(ids, str):
            ids = [ids]
        req = pb.GetRequest(
            collection=collection, ids=list(ids), with_vectors=with_vectors, with_inputs=with_inputs
        )
        return Items.from_pb(self._items.Get(req, timeout=self.timeout), with_vectors, with_inputs)

    @translate
    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Deletes items; returns how many of the ids existed."""
        if isinstance(ids, str):
            ids = [ids]
        return self._items.Delete(
            pb.DeleteRequest(collection=collection, ids=list(ids)), timeout=self.timeout
        ).deleted

    @translate
    def search(
        self,
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
    ) -> SearchResult:
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
        r = self._items.Search(req, timeout=self.timeout)
        return SearchResult.from_pb(r, with_vectors, with_metadata, rerank > 0)

    @translate
    def search_batch(
        self,
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
    ) -> BatchSearchResult:
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
        r = self._items.SearchBatch(req, timeout=self.timeout)
        results = [
            SearchResult.from_pb(x, with_vectors, with_metadata, rerank > 0) for x in r.results
        ]
        return BatchSearchResult.from_results(results, k)

    @translate
    def classify(self, collection: str, query: Any, k: int = 10) -> Classification:
        """Identification: a distance-weighted vote of the k nearest items' labels."""
        req = pb.ClassifyRequest(collection=collection, query=cv.to_query(query), k=k)
        return Classification.from_pb(self._items.Classify(req, timeout=self.timeout))

    @translate
    def verify(self, collection: str, a: Any, b: Any) -> Verification:
        """Verification: are a and b (each a query as `search` takes it) the same?"""
        req = pb.VerifyRequest(collection=collection, a=cv.to_query(a), b=cv.to_query(b))
        return Verification.from_pb(self._items.Verify(req, timeout=self.timeout))

    @translate
    def calibrate(self, collection: str, pairs: int = 0, seed: int = 0) -> Calibration:
        """Fits the logistic's margin and scale and the threshold on sampled labelled
        pairs, stores them in the collection, and reports how well they separate."""
        req = pb.CalibrateRequest(collection=collection, pairs=pairs, seed=seed)
        return Calibration.from_pb(self._items.Calibrate(req, timeout=self.timeout))

    # -- models ----------------------------------------------------------------------

    @translate
    def embed(
        self,
        inputs: Any,
        model: str = "",
        *,
        tower: str = "",
        batch_size: int = 256,
    ) -> np.ndarray:
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
            embedders = [m for m in self.list_models() if m.kind == "embedder"]
            if not embedders:
                raise LikenessError(grpc.StatusCode.NOT_FOUND, "the daemon has no embedder")
            model = sorted(m.name for m in embedders)[0]
        out: List[List[float]] = []
        for start in range(0, len(items), batch_size):
            req = pb.EmbedRequest(model=model, inputs=items[start : start + batch_size])
            out.extend(
                list(e.values) for e in self._embedder.Embed(req, timeout=self.timeout).embeddings
            )
        return cv.stack_vectors(out)

    @translate
    def list_models(self) -> List[ModelInfo]:
        r = self._models.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        return [ModelInfo.from_pb(m) for m in r.models]

    @translate
    def get_model(self, name: str) -> ModelInfo:
        return ModelInfo.from_pb(
            self._models.GetModel(pb.GetModelRequest(name=name), timeout=self.timeout)
        )

    @translate
    def publish(
        self,
        name: str,
        manifest: Union[str, os.PathLike],
        onnx: Union[bytes, str, os.PathLike, None] = None,
        chunk_bytes: int = 1 << 20,
    ) -> ModelInfo:
        """Publishes a new version of model `name` (Models.Publish). `manifest` is the
        TOML text or the path of a model.toml; `onnx` the .onnx bytes or path (default:
        the file the manifest's towers name, beside it). The manifest's `sha256` is set
        from the bytes when it has none. Returns the model as served, `NAME@VERSION`."""
        text, base = _read_manifest(manifest)
        if onnx is None:
            if base is None:
                raise ValueError("give onnx= when the manifest is text, not a path")
            onnx = os.path.join(base, _manifest_file(text))
        data = onnx if isinstance(onnx, (bytes, bytearray)) else open(onnx, "rb").read()
        if not any(line.strip().startswith("sha256") for line in text.splitlines()):
            text = f'sha256 = "{hashlib.sha256(data).hexdigest()}"\n' + text
        step = max(1, int(chunk_bytes))

        def chunks() -> Iterator[pb.ModelChunk]:
            yield pb.ModelChunk(name=name, manifest=text, bytes=bytes(data[:step]))
            for start in range(step, len(data), step):
                yield pb.ModelChunk(bytes=bytes(data[start : start + step]))

        return ModelInfo.from_pb(self._models.Publish(chunks(), timeout=self.timeout))

    @translate
    def activate(self, collection: str, model: str, version: str = "") -> CollectionInfo:
        """Switches `collection` to `model` (version: a published one; "" = as loaded at
        start): its stored inputs are re-embedded in the background, and it keeps serving
        its current vectors until the switch. See `wait_activation`."""
        req = pb.ActivateRequest(collection=collection, model=model, version=version)
        return CollectionInfo.from_pb(self._models.Activate(req, timeout=self.timeout))

    def wait_activation(
        self, collection: str, timeout: float = 600.0, poll: float = 0.2, progress: bool = False
    ) -> CollectionInfo:
        """Waits until the collection's activation is done; raises LikenessError when it
        failed and TimeoutError when `timeout` passes. `progress` shows a tqdm bar."""
        deadline = time.monotonic() + timeout
        bar = None
        try:
            while True:
                info = self.get_collection(collection)
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
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    # -- mining ----------------------------------------------------------------------

    def mine_triplets(
        self, collection: str, strategy: Any = "semi_hard", **options: Any
    ) -> TripletStream:
        """One pass of MineTriplets over the anchors: an iterator of TripletBatch; the
        stream's `stats` once it has ended. Options are MineRequest's fields
        (margin, negatives_per_anchor, positives_per_anchor, batch_size, max_triplets,
        seed, candidates, sample, skip_nearest, min_distance, max_distance, exclude_ids,
        min_generation, with_vectors, with_inputs, expansion) plus anchors=[ids],
        anchor_labels=[labels] and shard=(index, count). A bad request raises when
        iteration starts."""
        req = mine_request(collection, strategy, **options)
        return TripletStream(self._miner.MineTriplets(req), TripletBatch.from_pb)

    def mine_pairs(
        self, collection: str, strategy: Any = "semi_hard", **options: Any
    ) -> PairStream:
        """MinePairs: as mine_triplets, as labelled pairs (pos_margin, neg_margin)."""
        req = mine_request(collection, strategy, **options)
        return PairStream(self._miner.MinePairs(req), PairBatch.from_pb)

    def mine_batches(
        self,
        collection: str,
        *,
        classes: int = 8,
        per_class: int = 4,
        neighbours: Optional[int] = None,
        seed: int = 0,
        shard: Optional[Tuple[int, int]] = None,
        min_generation: int = 0,
        max_batches: int = 0,
        with_vectors: bool = False,
        with_inputs: bool = False,
        expansion: int = 0,
        candidates: int = 0,
    ) -> ClassBatchStream:
        """MineBatches: P x K batches for an in-batch miner, an iterator of ClassBatch;
        the stream's `stats` once it has ended.

        Each batch is an anchor class, then `neighbours` classes (default: P - 1) taken
        from the labels of the anchor-class items' nearest negatives (`candidates` of
        them per item; 0: 32), then random classes; `per_class` items of each
        (`classes` = P, `per_class` = K). max_batches=0 is one pass: every item of the
        shard (index, count) at least once. A bad request raises when iteration starts.
        """
        req = batch_request(
            collection,
            classes=classes,
            per_class=per_class,
            neighbours=neighbours,
            seed=seed,
            shard=shard,
            min_generation=min_generation,
            max_batches=max_batches,
            with_vectors=with_vectors,
            with_inputs=with_inputs,
            expansion=expansion,
            candidates=candidates,
        )
        return ClassBatchStream(self._miner.MineBatches(req), ClassBatch.from_pb)

    def session(self, collection: str, strategy: Any = "semi_hard", **options: Any) -> Session:
        """A Session: call `step(ids, vectors)` once per training step (see Session);
        `step(..., write_back=True)` makes it a cross-batch memory."""
        mine_request(collection, strategy, **options)  # bad options fail here, not mid-stream
        return Session(self._miner, collection, strategy, options)
