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
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import grpc
import numpy as np

from likeness._convert import STRATEGIES, enum
from likeness._signature import like
from likeness.errors import LikenessError, from_rpc_error, translated
from likeness.v1 import likeness_pb2 as pb

__all__ = [
    "MineOptions",
    "BatchOptions",
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


@dataclass(frozen=True)
class MineOptions:
    """MineRequest's options (MineTriplets, MinePairs, a Session). A 0 or None leaves
    the daemon's default, given after each field; docs/mining.md defines them."""

    margin: Optional[float] = None  # triplet margin alpha, SEMI_HARD's window; 0.2
    negatives_per_anchor: int = 0  # 1
    positives_per_anchor: int = 0  # 1; each positive makes its own triplets
    batch_size: int = 256  # anchors per message, at most 4096 (a Session ignores it)
    max_triplets: int = 0  # stop after this many triplets or pairs; 0: one pass
    seed: int = 0  # the same seed gives the same stream on the same data
    candidates: int = 0  # ANN candidate pool per anchor; 64
    sample: int = 0  # uniform negatives drawn beside the kNN pool by the window
    # strategies and DISTANCE_WEIGHTED; 64
    skip_nearest: int = 0  # skip this many nearest negatives (often mislabelled)
    min_distance: Optional[float] = None  # bounds on d_an
    max_distance: Optional[float] = None
    pos_margin: Optional[float] = None  # MinePairs: keep positive pairs with d > this
    neg_margin: Optional[float] = None  # MinePairs: keep negative pairs with d < this
    exclude_ids: Sequence[str] = ()  # never anchor, positive or negative
    min_generation: int = 0  # leave out items of an older generation
    anchors: Optional[Sequence[str]] = None  # anchor ids; default: every labelled item
    anchor_labels: Optional[Sequence[str]] = None  # or the items with these labels
    shard: Optional[Tuple[int, int]] = None  # (index, count): anchors by FNV-1a of the id
    with_vectors: bool = False  # carry each used item's stored vector in `items`
    with_inputs: bool = False  # and its stored input
    expansion: int = 0  # HNSW expansion for the negative search; the collection's

    def request(self, collection: str, strategy: Any) -> pb.MineRequest:
        """The MineRequest; strategy: "random", "hard", "semi_hard" (or "semi-hard"),
        "distance_weighted", "batch_hard", "multi_similarity", or the proto's number."""
        if self.anchors is not None and self.anchor_labels is not None:
            raise ValueError("give anchors (ids) or anchor_labels, not both")
        req = pb.MineRequest(collection=collection, strategy=enum(strategy, STRATEGIES, "strategy"))
        _fill(req, self, ("anchors", "anchor_labels"))
        if self.anchors is not None:
            req.anchors.ids.ids.extend(self.anchors)
        elif self.anchor_labels is not None:
            req.anchors.labels.labels.extend(self.anchor_labels)
        return req


@dataclass(frozen=True)
class BatchOptions:
    """BatchRequest's options (MineBatches): P x K batches for an in-batch miner."""

    classes: int = 8  # P: classes per batch, at most 1024
    per_class: int = 4  # K: items per class, at most 1024
    neighbours: Optional[int] = None  # classes chosen as the anchor class's nearest; P - 1
    seed: int = 0  # the same seed gives the same stream on the same data
    shard: Optional[Tuple[int, int]] = None  # (index, count): items by FNV-1a of the id
    min_generation: int = 0  # leave out items of an older generation
    max_batches: int = 0  # stop after this many batches; 0: one pass over the shard
    with_vectors: bool = False  # carry the items' stored vectors
    with_inputs: bool = False  # and their stored inputs
    expansion: int = 0  # HNSW expansion for the neighbour-class search; the collection's
    candidates: int = 0  # nearest negatives looked at per anchor-class item; 32

    def request(self, collection: str) -> pb.BatchRequest:
        req = pb.BatchRequest(collection=collection)
        _fill(req, self, ())
        return req


def _fill(req: Any, options: Any, skip: Sequence[str]) -> None:
    """Copies the options' fields into the request message of the same field names."""
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name in skip or value is None:
            continue
        if f.name == "shard":
            index, count = value
            req.shard.index, req.shard.count = int(index), int(count)
        elif f.name == "exclude_ids":
            req.exclude_ids.extend(value)
        else:
            setattr(req, f.name, value)


O = TypeVar("O", MineOptions, BatchOptions)


def merge_options(cls: Type[O], options: Optional[O], overrides: Mapping[str, Any]) -> O:
    """`options` (default: cls()) with the keyword overrides; an unknown name is a
    TypeError naming it."""
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise TypeError(f"options is a {cls.__name__}, not {type(options).__name__}")
    known = {f.name for f in fields(cls)}
    for key in overrides:
        if key not in known:
            what = "mining" if cls is MineOptions else "MineBatches"
            raise TypeError(f"unknown {what} option {key!r}")
    return replace(options, **overrides) if overrides else options


def mine_request(
    collection: str, strategy: Any, options: Optional[MineOptions] = None, **overrides: Any
) -> pb.MineRequest:
    """A MineRequest from a MineOptions and/or its fields by name."""
    return merge_options(MineOptions, options, overrides).request(collection, strategy)


def batch_request(
    collection: str, options: Optional[BatchOptions] = None, **overrides: Any
) -> pb.BatchRequest:
    """A BatchRequest from a BatchOptions and/or its fields by name."""
    return merge_options(BatchOptions, options, overrides).request(collection)


class StreamBase:
    """What the blocking and asyncio mining streams share: each message to a batch, and
    `stats` from the last one."""

    # The field that holds a message's results: a last message that carries some is
    # yielded too.
    _rows = "triplets"

    def __init__(self, call: Any):
        self._call = call
        self.stats: Optional[MineStats] = None

    @staticmethod
    def _convert(msg: Any) -> Any:
        raise NotImplementedError

    def _take(self, msg: Any) -> List[Any]:
        """The batch `msg` holds (none for a last message without rows)."""
        if msg.last:
            self.stats = MineStats.from_pb(msg.stats)
            if not len(getattr(msg, self._rows)):
                return []
        return [self._convert(msg)]

    def cancel(self) -> None:
        """Stops the stream; the daemon stops mining for it."""
        self._call.cancel()


class TripletRows:
    _rows = "triplets"
    _convert = staticmethod(TripletBatch.from_pb)


class PairRows:
    _rows = "pairs"
    _convert = staticmethod(PairBatch.from_pb)


class ClassRows:
    _rows = "items"
    _convert = staticmethod(ClassBatch.from_pb)


class _Stream(StreamBase):
    """A server stream: iterate for batches; `stats` is set once it has ended."""

    def __iter__(self):
        with translated():
            for msg in self._call:
                yield from self._take(msg)
                if msg.last:
                    return

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()


class TripletStream(TripletRows, _Stream):
    """MineTriplets: an iterator of TripletBatch."""

    def __iter__(self) -> Iterator[TripletBatch]:
        return super().__iter__()


class PairStream(PairRows, _Stream):
    """MinePairs: an iterator of PairBatch."""

    def __iter__(self) -> Iterator[PairBatch]:
        return super().__iter__()


class ClassBatchStream(ClassRows, _Stream):
    """MineBatches: an iterator of ClassBatch."""

    def __iter__(self) -> Iterator[ClassBatch]:
        return super().__iter__()


class SessionBase:
    """What the blocking and asyncio Sessions share: the options, step numbers, the
    step messages and the answers."""

    def __init__(self, collection: str, strategy: Any, options: MineOptions):
        self._collection = collection
        self._strategy = strategy
        self._options = options
        # Sent with the next step: the first, and the one after an update.
        self._request: Optional[pb.MineRequest] = options.request(collection, strategy)
        self._request_lock = threading.Lock()
        self._next_step = 0
        self._closed = False
        self.written_step: Optional[int] = None

    def update(
        self, options: Optional[MineOptions] = None, *, strategy: Any = None, **overrides: Any
    ) -> None:
        """Changes the mining options from the next step on. options: a MineOptions in
        place of the current ones; names (strategy, margin, ...): changes over them."""
        merged = merge_options(MineOptions, options or self._options, overrides)
        strategy = self._strategy if strategy is None else strategy
        request = merged.request(self._collection, strategy)
        with self._request_lock:
            self._options, self._strategy, self._request = merged, strategy, request

    def _message(
        self,
        ids: Sequence[str],
        vectors: Any = None,
        labels: Optional[Sequence[str]] = None,
        step: Optional[int] = None,
        write_back: bool = False,
    ) -> pb.MineStep:
        """Mines for this step's anchors.

        ids: the anchors. vectors: optional (n, d) array of the trainer's current
        embeddings of them (a torch tensor is fine; it is copied to the CPU); without
        it the stored vectors are used. labels: for ids not yet stored (new anchors
        need a label and a vector); "" keeps a stored item's label. write_back: write
        the vectors back into the collection after mining (see the class).
        """
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
        with self._request_lock:
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
        return msg

    def _answer(self, answer: Any) -> TripletBatch:
        """The step's TripletBatch; an error when the stream ended or failed instead."""
        if isinstance(answer, grpc.RpcError):
            self._closed = True
            raise from_rpc_error(answer)
        if answer is None:
            self._closed = True
            raise LikenessError(grpc.StatusCode.UNKNOWN, "the session ended without an answer")
        batch = TripletBatch.from_pb(answer)
        if batch.written_step is not None:
            self.written_step = batch.written_step
        return batch


_CLOSE = object()


class Session(SessionBase):
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

    def __init__(self, open_call: Any, collection: str, strategy: Any, options: MineOptions):
        super().__init__(collection, strategy, options)
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._lock = threading.Lock()
        self._responses = open_call(self._requests())

    def _requests(self):
        while True:
            m = self._queue.get()
            if m is _CLOSE:
                return
            yield m

    @like(SessionBase._message, TripletBatch)
    def step(self, *args: Any, **kwargs: Any) -> TripletBatch:
        with self._lock:
            self._queue.put(self._message(*args, **kwargs))
            try:
                answer = next(self._responses, None)
            except grpc.RpcError as e:
                answer = e
            return self._answer(answer)

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
