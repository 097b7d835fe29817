"""Mining: streams of triplets, pairs and class batches, Sessions, and the shard hash.

A MinedBatch holds triplets (anchor, positive, [negatives]); here each is flattened to
one row per (anchor, positive, negative), the form triplet losses take. Pairs stay
pairs. A ClassBatch (MineBatches) is P classes of K items each, for an in-batch miner.
With `with_vectors` / `with_inputs` each batch carries every item it uses, once, in
`items`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from likeness._convert import STRATEGIES, enum
from likeness.errors import LikenessError, from_rpc_error
from likeness.v1 import likeness_pb2 as pb

__all__ = [
    "fnv1a",
    "shard_of",
    "MinedItem",
    "MineStats",
    "TripletBatch",
    "PairBatch",
    "ClassBatch",
    "TripletStream",
    "PairStream",
    "ClassBatchStream",
    "Session",
]


def fnv1a(data: bytes) -> int:
    """FNV-1a, 64 bits: the hash the daemon shards anchors by."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def shard_of(item_id: str, count: int) -> int:
    """The shard (of `count`) that the daemon puts this anchor id in."""
    return fnv1a(item_id.encode("utf-8")) % count if count > 1 else 0


@dataclass
class MinedItem:
    id: str
    label: str
    vector: Optional[np.ndarray]  # (d,) float32, with with_vectors
    input: Optional[pb.Input]  # with with_inputs, when the collection keeps inputs
    generation: int


@dataclass
class MineStats:
    anchors: int
    anchors_without_triplet: int
    triplets: int
    pairs: int
    candidates_examined: int
    rejections: Dict[str, int]
    fallbacks: Dict[str, int]
    seconds: float
    anchors_per_second: float
    triplets_per_second: float
    # Per source, the negatives that came from it: "knn", "sample", "second_search",
    # "random".
    sources: Dict[str, int] = field(default_factory=dict)
    # Session with write_back: items written back (durable) by the steps so far.
    written: int = 0
    # MineBatches: batches, and classes chosen as neighbours / at random.
    batches: int = 0
    neighbour_classes: int = 0
    random_classes: int = 0

    @classmethod
    def from_pb(cls, s: pb.MineStats) -> "MineStats":
        return cls(
            anchors=s.anchors,
            anchors_without_triplet=s.anchors_without_triplet,
            triplets=s.triplets,
            pairs=s.pairs,
            candidates_examined=s.candidates_examined,
            rejections=dict(s.rejections),
            fallbacks=dict(s.fallbacks),
            seconds=s.seconds,
            anchors_per_second=s.anchors_per_second,
            triplets_per_second=s.triplets_per_second,
            sources=dict(s.sources),
            written=s.written,
            batches=s.batches,
            neighbour_classes=s.neighbour_classes,
            random_classes=s.random_classes,
        )


def _generation(b: Any) -> Optional[Tuple[int, int]]:
    return (b.generation.oldest, b.generation.newest) if b.HasField("generation") else None


def _items(raw: Sequence[pb.MinedItem]) -> Dict[str, MinedItem]:
    out = {}
    for i in raw:
        out[i.id] = MinedItem(
            id=i.id,
            label=i.label,
            vector=np.array(i.vector, dtype=np.float32) if len(i.vector) else None,
            input=i.input if i.HasField("input") else None,
            generation=i.generation,
        )
    return out


class _WithItems:
    items: Dict[str, MinedItem]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The items' vectors as an (n, d) float32 array (needs with_vectors)."""
        try:
            rows = [self.items[i].vector for i in ids]
        except KeyError as e:
            raise KeyError(
                f"item {e} is not in this batch's items: mine with_vectors=True"
            ) from None
        if any(r is None for r in rows):
            raise ValueError("this batch carries no vectors: mine with_vectors=True")
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(rows)

    def labels_of(self, ids: Sequence[str]) -> List[str]:
        return [self.items[i].label for i in ids]


@dataclass
class TripletBatch(_WithItems):
    """One message of triplets, one row per (anchor, positive, negative)."""

    anchor_ids: List[str]
    positive_ids: List[str]
    negative_ids: List[str]
    d_ap: np.ndarray  # (r,) float32
    d_an: np.ndarray  # (r,) float32
    fallback: np.ndarray  # (r,) bool: SEMI_HARD took a negative beyond the window
    items: Dict[str, MinedItem]
    generation: Optional[Tuple[int, int]]  # oldest, newest item generation used
    step: int  # Session: the step this answers
    stats: Optional[MineStats]
    raw: pb.MinedBatch
    # Session with write_back: the last step whose write-back is durable (None: none yet).
    written_step: Optional[int] = None

    def __len__(self) -> int:
        return len(self.anchor_ids)

    @classmethod
    def from_pb(cls, b: pb.MinedBatch) -> "TripletBatch":
        a, p, n, dap, dan, fb = [], [], [], [], [], []
        for t in b.triplets:
            for neg, d in zip(t.negative_ids, t.d_an):
                a.append(t.anchor_id)
                p.append(t.positive_id)
                n.append(neg)
                dap.append(t.d_ap)
                dan.append(d)
                fb.append(t.fallback)
        return cls(
            anchor_ids=a,
            positive_ids=p,
            negative_ids=n,
            d_ap=np.array(dap, dtype=np.float32),
            d_an=np.array(dan, dtype=np.float32),
            fallback=np.array(fb, dtype=bool),
            items=_items(b.items),
            generation=_generation(b),
            step=b.step,
            stats=MineStats.from_pb(b.stats) if b.HasField("stats") else None,
            raw=b,
            written_step=b.written_step if b.HasField("written_step") else None,
        )


@dataclass
class PairBatch(_WithItems):
    """One message of labelled pairs."""

    a_ids: List[str]
    b_ids: List[str]
    same: np.ndarray  # (r,) bool
    distances: np.ndarray  # (r,) float32
    items: Dict[str, MinedItem]
    generation: Optional[Tuple[int, int]]
    stats: Optional[MineStats]
    raw: pb.MinedPairBatch

    def __len__(self) -> int:
        return len(self.a_ids)

    @classmethod
    def from_pb(cls, b: pb.MinedPairBatch) -> "PairBatch":
        return cls(
            a_ids=[p.a_id for p in b.pairs],
            b_ids=[p.b_id for p in b.pairs],
            same=np.array([p.same for p in b.pairs], dtype=bool),
            distances=np.array([p.distance for p in b.pairs], dtype=np.float32),
            items=_items(b.items),
            generation=_generation(b),
            stats=MineStats.from_pb(b.stats) if b.HasField("stats") else None,
            raw=b,
        )


@dataclass
class ClassBatch(_WithItems):
    """One MineBatches message: P classes of K items each (fewer for a class with fewer
    items in the shard), class by class, the anchor class first.

    `ids[i]` has label `labels[i]`; `classes` are the P labels in the order of the
    items: the anchor class, its `neighbours` nearest classes (the labels of its items'
    nearest negatives, nearest first), then random classes. `class_distances[j]` is the
    distance from the anchor class's items to the nearest item found of class j: 0 for
    the anchor class, NaN for a random one. With with_vectors / with_inputs, `items`
    (by id) carry the stored vectors / inputs.
    """

    ids: List[str]
    labels: List[str]
    classes: List[str]
    neighbours: int
    class_distances: np.ndarray  # (P,) float32
    batch: int  # this batch's number in the stream, from 0
    pass_: int  # the pass it belongs to, from 0
    items: Dict[str, MinedItem]
    generation: Optional[Tuple[int, int]]
    stats: Optional[MineStats]
    raw: pb.ClassBatch

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_pb(cls, b: pb.ClassBatch) -> "ClassBatch":
        return cls(
            ids=[i.id for i in b.items],
            labels=[i.label for i in b.items],
            classes=list(b.classes),
            neighbours=b.neighbours,
            class_distances=np.array(b.class_distances, dtype=np.float32),
            batch=b.batch,
            pass_=getattr(b, "pass"),
            items=_items(b.items),
            generation=_generation(b),
            stats=MineStats.from_pb(b.stats) if b.HasField("stats") else None,
            raw=b,
        )


def mine_request(collection: str, strategy: Any, **options: Any) -> pb.MineRequest:
    """A MineRequest from keyword options named as the proto's fields, plus:

    - strategy: "random", "hard", "semi_hard" (or "semi-hard"), "distance_weighted",
      "batch_hard", "multi_similarity", or the proto's number;
    - batch_size: anchors per message, 256 unless given;
    - anchors: a list of anchor ids; anchor_labels: a list of labels (default: all);
    - shard: (index, count).

    Among the fields: sample, the uniform negatives that the window strategies and
    DISTANCE_WEIGHTED draw per anchor beside the kNN pool (0: the daemon's 64).
    """
    opts = dict(options)
    # The daemon's default too (0 means it); sent anyway for daemons that required it.
    opts.setdefault("batch_size", 256)
    anchors = opts.pop("anchors", None)
    anchor_labels = opts.pop("anchor_labels", None)
    shard = opts.pop("shard", None)
    exclude = opts.pop("exclude_ids", None)
    if anchors is not None and anchor_labels is not None:
        raise ValueError("give anchors (ids) or anchor_labels, not both")
    req = pb.MineRequest(collection=collection, strategy=enum(strategy, STRATEGIES, "strategy"))
    for key, value in opts.items():
        if value is None:
            continue
        if key not in pb.MineRequest.DESCRIPTOR.fields_by_name:
            raise TypeError(f"unknown mining option {key!r}")
        setattr(req, key, value)
    if anchors is not None:
        req.anchors.ids.ids.extend(anchors)
    elif anchor_labels is not None:
        req.anchors.labels.labels.extend(anchor_labels)
    if shard is not None:
        index, count = shard
        req.shard.index, req.shard.count = int(index), int(count)
    if exclude:
        req.exclude_ids.extend(exclude)
    return req


def batch_request(
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
) -> pb.BatchRequest:
    """A BatchRequest (MineBatches); shard is (index, count), neighbours None = P - 1."""
    req = pb.BatchRequest(
        collection=collection,
        classes=classes,
        per_class=per_class,
        seed=seed,
        min_generation=min_generation,
        max_batches=max_batches,
        with_vectors=with_vectors,
        with_inputs=with_inputs,
        expansion=expansion,
        candidates=candidates,
    )
    if neighbours is not None:
        req.neighbours = neighbours
    if shard is not None:
        index, count = shard
        req.shard.index, req.shard.count = int(index), int(count)
    return req


class _Stream:
    """A server stream: iterate for batches; `stats` is set once it has ended."""

    # The field that holds a message's results: a last message that carries some is
    # yielded too.
    _rows = "triplets"

    def __init__(self, call, convert):
        self._call = call
        self._convert = convert
        self.stats: Optional[MineStats] = None

    def __iter__(self):
        try:
            for msg in self._call:
                if msg.last:
                    self.stats = MineStats.from_pb(msg.stats)
                    if len(getattr(msg, self._rows)):
                        yield self._convert(msg)
                    return
                yield self._convert(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> None:
        """Stops the stream; the daemon stops mining for it."""
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()


class TripletStream(_Stream):
    """MineTriplets: an iterator of TripletBatch."""

    def __iter__(self) -> Iterator[TripletBatch]:
        return super().__iter__()


class PairStream(_Stream):
    """MinePairs: an iterator of PairBatch."""

    _rows = "pairs"

    def __iter__(self) -> Iterator[PairBatch]:
        return super().__iter__()


class ClassBatchStream(_Stream):
    """MineBatches: an iterator of ClassBatch."""

    _rows = "items"

    def __iter__(self) -> Iterator[ClassBatch]:
        return super().__iter__()


_CLOSE = object()


class Session:
    """A training loop's feed (Miner.Session): one `step` per training step.

    Each step sends the step's anchors (stored ids, optionally with the trainer's fresh
    vectors for them, or new ids with labels and vectors) and returns the TripletBatch
    mined for them against the collection as it stands. Steps are numbered 0, 1, ...
    unless given. Use it as a context manager, or call close().

    A step with ``write_back=True`` is a cross-batch memory step: once it is mined, the
    daemon writes each anchor that came with a vector back into the collection (that
    vector, the step's label or the stored one, generation = the step number; metadata
    and stored inputs kept). The answer does not wait for that write; it is durable
    before the next step is mined, and close() returns once the last one is.
    `written_step` is the last step whose write-back the daemon has reported durable
    (None: none yet).
    """

    def __init__(
        self,
        stub,
        collection: str,
        strategy: Any,
        options: Dict[str, Any],
        timeout: Optional[float] = None,
    ):
        self._collection = collection
        self._options = dict(options, strategy=strategy)
        self._request: Optional[pb.MineRequest] = mine_request(collection, **self._options)
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._lock = threading.Lock()
        self._next_step = 0
        self._closed = False
        self.written_step: Optional[int] = None
        self._responses = stub.Session(self._requests(), timeout=timeout)

    def _requests(self):
        while True:
            m = self._queue.get()
            if m is _CLOSE:
                return
            yield m

    def update(self, **options: Any) -> None:
        """Changes the mining options from the next step on (strategy, margin, ...)."""
        merged = dict(self._options, **options)
        request = mine_request(self._collection, **merged)
        with self._lock:
            self._options = merged
            self._request = request

    def step(
        self,
        ids: Sequence[str],
        vectors: Any = None,
        labels: Optional[Sequence[str]] = None,
        step: Optional[int] = None,
        write_back: bool = False,
    ) -> TripletBatch:
        """Mines for this step's anchors.

        ids: the anchors. vectors: optional (n, d) array of the trainer's current
        embeddings of them (a torch tensor is fine; it is copied to the CPU); without
        it the stored vectors are used. labels: for ids not yet stored (new anchors
        need a label and a vector); "" keeps a stored item's label. write_back: write
        the vectors back into the collection after mining (see the class).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the session is closed")
            n = len(ids)
            if vectors is not None:
                if hasattr(vectors, "detach"):
                    vectors = vectors.detach().cpu().numpy()
                vectors = np.asarray(vectors, dtype=np.float32)
                if vectors.ndim != 2 or vectors.shape[0] != n:
                    raise ValueError(f"vectors must be ({n}, d), got shape {vectors.shape}")
            if labels is not None and len(labels) != n:
                raise ValueError(f"{len(labels)} labels for {n} ids")
            number = self._next_step if step is None else int(step)
            self._next_step = number + 1
            msg = pb.MineStep(step=number, write_back=write_back)
            if self._request is not None:
                msg.request.CopyFrom(self._request)
                self._request = None
            rows = vectors.tolist() if vectors is not None else None
            for i, item_id in enumerate(ids):
                a = msg.anchors.add(id=item_id)
                if labels is not None and labels[i]:
                    a.label = labels[i]
                if rows is not None:
                    a.vector.extend(rows[i])
            self._queue.put(msg)
            try:
                answer = next(self._responses)
            except grpc.RpcError as e:
                self._closed = True
                raise from_rpc_error(e) from None
            except StopIteration:
                self._closed = True
                raise LikenessError(
                    grpc.StatusCode.UNKNOWN, "the session ended without an answer"
                ) from None
            batch = TripletBatch.from_pb(answer)
            if batch.written_step is not None:
                self.written_step = batch.written_step
            return batch

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_CLOSE)
                try:
                    for _ in self._responses:
                        pass
                except grpc.RpcError:
                    pass

    def __del__(self) -> None:
        # An abandoned session still ends its request stream, so the call can finish.
        if not getattr(self, "_closed", True):
            self._queue.put(_CLOSE)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
