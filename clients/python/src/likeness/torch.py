"""PyTorch datasets over likeness's miner (the `likeness[torch]` extra).

- MinedTripletDataset / MinedPairDataset: IterableDatasets over one MineTriplets /
  MinePairs pass per epoch. Each DataLoader worker of each torch.distributed rank mines
  its own shard of the anchors (shard index = rank * num_workers + worker_id, count =
  world_size * num_workers), so a multi-GPU job sees disjoint anchors that together
  cover all of them. Use them with ``DataLoader(dataset, batch_size=None)``: each
  element is already a batch (one mined message).
- NeighbourClassBatches: an IterableDataset over MineBatches: P x K batches whose
  classes the index chose to be hard for each other, for an in-batch miner; sharded
  the same way (items rather than anchors).
- SessionFeed: a Miner Session the training loop drives itself, one ``step(ids,
  embeddings)`` per training step; it is not a Dataset, because what it mines depends on
  the trainer's current embeddings, which live in the training process.
- CollectionMemory: a cross-batch memory kept in the collection: each step sends the
  batch's fresh embeddings, gets back the stored vectors of their mined positives and
  negatives as ``ref_emb`` / ``ref_labels``, and the daemon writes the fresh ones back.

Every batch holds each item it uses once, in `data` (the stored vectors, or the stored
inputs with ``data="inputs"``), with integer `labels`, and `indices_tuple` into it: the
form pytorch-metric-learning's losses take (``loss(model(b.data), b.labels,
b.indices_tuple)``), and plain torch losses index it (``b.anchors``, ...).
"""

from __future__ import annotations

import io
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from likeness.client import Client
from likeness.mining import (
    BatchOptions,
    ClassBatch,
    MinedItem,
    MineOptions,
    MineStats,
    PairBatch,
    Session,
    TripletBatch,
    merge_options,
)
from likeness.v1 import likeness_pb2 as pb

__all__ = [
    "MinedTriplets",
    "MinedPairs",
    "SessionTriplets",
    "NeighbourBatch",
    "MemoryRefs",
    "MinedTripletDataset",
    "MinedPairDataset",
    "NeighbourClassBatches",
    "SessionFeed",
    "CollectionMemory",
    "decode_input",
    "current_shard",
]

Transform = Callable[[pb.Input], torch.Tensor]


def decode_input(inp: pb.Input) -> torch.Tensor:
    """A stored input as a float32 tensor: a raw tensor in its own shape; an image
    decoded with Pillow to (channels, height, width), scaled to [0, 1]."""
    kind = inp.WhichOneof("kind")
    if kind == "tensor":
        shape = tuple(inp.tensor.shape)
        return torch.tensor(list(inp.tensor.values), dtype=torch.float32).reshape(shape)
    if kind == "image":
        from PIL import Image

        a = np.asarray(Image.open(io.BytesIO(inp.image)), dtype=np.float32) / 255.0
        if a.ndim == 2:
            a = a[None]
        else:
            a = np.ascontiguousarray(a.transpose(2, 0, 1))
        return torch.from_numpy(a)
    raise ValueError("an empty input")


def current_shard(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """This process's (index, count) of the anchors: rank * num_workers + worker id, of
    world_size * num_workers. Rank and world size come from torch.distributed when it
    is initialised and they are not given."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size}")
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world_size * workers


class _Coder:
    """Label names to integer codes: the caller's table, or codes in order of first
    appearance within the batch (what pair and triplet losses need: equal labels,
    equal codes)."""

    def __init__(self, table: Optional[Mapping[str, int]]):
        self.table = table
        self.names: List[str] = []
        self.codes: Dict[str, int] = {}

    def __call__(self, label: str) -> int:
        if self.table is not None:
            try:
                return int(self.table[label])
            except KeyError:
                raise KeyError(f"label {label!r} is not in label_ids") from None
        if label not in self.codes:
            self.codes[label] = len(self.names)
            self.names.append(label)
        return self.codes[label]


def _data(items: Sequence[MinedItem], use: str, transform: Optional[Transform]) -> torch.Tensor:
    if use == "vectors":
        if any(i.vector is None for i in items):
            raise ValueError("an item came without its vector")
        if not items:
            return torch.zeros((0, 0), dtype=torch.float32)
        return torch.from_numpy(np.stack([i.vector for i in items]))
    if any(i.input is None for i in items):
        missing = next(i.id for i in items if i.input is None)
        raise ValueError(f"item {missing!r} has no stored input (does the collection keep inputs?)")
    decode = transform or decode_input
    return torch.stack([decode(i.input) for i in items]) if items else torch.zeros((0,))


def _unique(
    batch_items: Dict[str, MinedItem], order: Sequence[str]
) -> Tuple[List[str], Dict[str, int]]:
    ids: List[str] = []
    index: Dict[str, int] = {}
    for i in order:
        if i not in index:
            if i not in batch_items:
                raise ValueError(f"item {i!r} is missing from the batch's items")
            index[i] = len(ids)
            ids.append(i)
    return ids, index


@dataclass
class MinedTriplets:
    """Triplets as tensors. `data[i]` is item `ids[i]` (each item once); row r of the
    triplets is (indices_tuple[0][r], indices_tuple[1][r], indices_tuple[2][r]).

    pytorch-metric-learning: ``loss_fn(model(b.data), b.labels, b.indices_tuple)``.
    torch: ``e = model(b.data); a, p, n = b.indices_tuple;
    F.triplet_margin_loss(e[a], e[p], e[n])``, or b.anchors / b.positives / b.negatives
    when data are the vectors themselves.
    """

    data: torch.Tensor  # (u, d) vectors or (u, *input shape) inputs
    labels: torch.Tensor  # (u,) int64
    indices_tuple: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (r,) int64 each
    ids: List[str]
    label_names: List[str]  # code -> label, when codes are per batch
    d_ap: torch.Tensor  # (r,) float32, under the stored vectors
    d_an: torch.Tensor  # (r,) float32
    stats: Optional[MineStats] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.indices_tuple[0])

    @property
    def anchors(self) -> torch.Tensor:
        return self.data[self.indices_tuple[0]]

    @property
    def positives(self) -> torch.Tensor:
        return self.data[self.indices_tuple[1]]

    @property
    def negatives(self) -> torch.Tensor:
        return self.data[self.indices_tuple[2]]

    def to(self, device: Any) -> "MinedTriplets":
        a, p, n = self.indices_tuple
        return MinedTriplets(
            self.data.to(device),
            self.labels.to(device),
            (a.to(device), p.to(device), n.to(device)),
            self.ids,
            self.label_names,
            self.d_ap.to(device),
            self.d_an.to(device),
            self.stats,
        )


def triplets_to_tensors(
    batch: TripletBatch,
    use: str = "vectors",
    label_ids: Optional[Mapping[str, int]] = None,
    transform: Optional[Transform] = None,
) -> MinedTriplets:
    """A TripletBatch (mined with_vectors, or with_inputs for use="inputs") as tensors."""
    order = [
        x for row in zip(batch.anchor_ids, batch.positive_ids, batch.negative_ids) for x in row
    ]
    ids, index = _unique(batch.items, order)
    items = [batch.items[i] for i in ids]
    coder = _Coder(label_ids)
    labels = torch.tensor([coder(i.label) for i in items], dtype=torch.int64)
    idx = tuple(
        torch.tensor([index[i] for i in col], dtype=torch.int64)
        for col in (batch.anchor_ids, batch.positive_ids, batch.negative_ids)
    )
    return MinedTriplets(
        data=_data(items, use, transform),
        labels=labels,
        indices_tuple=idx,  # type: ignore[arg-type]
        ids=ids,
        label_names=coder.names,
        d_ap=torch.from_numpy(batch.d_ap),
        d_an=torch.from_numpy(batch.d_an),
        stats=batch.stats,
    )


@dataclass
class MinedPairs:
    """Labelled pairs as tensors. `data[i]` is item `ids[i]`; pair r is
    (pairs[r, 0], pairs[r, 1]), `same[r]` says whether it is positive.

    pytorch-metric-learning pair losses (ContrastiveLoss, ...):
    ``loss_fn(model(b.data), b.labels, b.indices_tuple)`` with the 4-tuple
    (positive a, positive b, negative a, negative b).
    """

    data: torch.Tensor
    labels: torch.Tensor  # (u,) int64
    pairs: torch.Tensor  # (r, 2) int64
    same: torch.Tensor  # (r,) bool
    distances: torch.Tensor  # (r,) float32, under the stored vectors
    ids: List[str]
    label_names: List[str]
    stats: Optional[MineStats] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def indices_tuple(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pos, neg = self.pairs[self.same], self.pairs[~self.same]
        return pos[:, 0], pos[:, 1], neg[:, 0], neg[:, 1]

    @property
    def a(self) -> torch.Tensor:
        return self.data[self.pairs[:, 0]]

    @property
    def b(self) -> torch.Tensor:
        return self.data[self.pairs[:, 1]]


def pairs_to_tensors(
    batch: PairBatch,
    use: str = "vectors",
    label_ids: Optional[Mapping[str, int]] = None,
    transform: Optional[Transform] = None,
) -> MinedPairs:
    """A PairBatch (mined with_vectors, or with_inputs) as tensors."""
    order = [x for row in zip(batch.a_ids, batch.b_ids) for x in row]
    ids, index = _unique(batch.items, order)
    items = [batch.items[i] for i in ids]
    coder = _Coder(label_ids)
    labels = torch.tensor([coder(i.label) for i in items], dtype=torch.int64)
    pairs = torch.tensor(
        [[index[a], index[b]] for a, b in zip(batch.a_ids, batch.b_ids)], dtype=torch.int64
    )
    return MinedPairs(
        data=_data(items, use, transform),
        labels=labels,
        pairs=pairs.reshape(-1, 2),
        same=torch.from_numpy(batch.same),
        distances=torch.from_numpy(batch.distances),
        ids=ids,
        label_names=coder.names,
        stats=batch.stats,
    )


@dataclass
class NeighbourBatch:
    """One MineBatches batch as tensors: item i is `ids[i]`, of class `labels[i]`.

    With codes per batch (no label_ids), class j of the batch has code j: the anchor
    class is 0, and `label_names` is `classes`. `data` is the stored vectors (or
    decoded inputs) when the dataset was asked for them, else None: look the ids up in
    your own data. An in-batch miner takes it as it is:
    ``loss_fn(emb, b.labels, miner(emb, b.labels))``.
    """

    ids: List[str]
    labels: torch.Tensor  # (n,) int64
    label_names: List[str]  # code -> label, when codes are per batch
    classes: List[str]  # the P labels: the anchor class, its neighbours, random classes
    neighbours: int  # how many of classes[1:] are neighbours of classes[0]
    class_distances: torch.Tensor  # (P,) float32: 0 anchor, NaN random
    batch: int
    pass_: int
    data: Optional[torch.Tensor] = None  # (n, d) vectors or (n, *input shape) inputs

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: Any) -> "NeighbourBatch":
        return NeighbourBatch(
            self.ids,
            self.labels.to(device),
            self.label_names,
            self.classes,
            self.neighbours,
            self.class_distances.to(device),
            self.batch,
            self.pass_,
            self.data.to(device) if self.data is not None else None,
        )


def class_batch_to_tensors(
    batch: ClassBatch,
    use: Optional[str] = None,
    label_ids: Optional[Mapping[str, int]] = None,
    transform: Optional[Transform] = None,
) -> NeighbourBatch:
    """A ClassBatch as tensors; use: None (ids and labels only), "vectors" (mined
    with_vectors) or "inputs" (mined with_inputs)."""
    coder = _Coder(label_ids)
    for name in batch.classes:  # per-batch codes follow the batch's class order
        coder(name)
    return NeighbourBatch(
        ids=list(batch.ids),
        labels=torch.tensor([coder(label) for label in batch.labels], dtype=torch.int64),
        label_names=coder.names,
        classes=list(batch.classes),
        neighbours=batch.neighbours,
        class_distances=torch.from_numpy(batch.class_distances),
        batch=batch.batch,
        pass_=batch.pass_,
        data=_data([batch.items[i] for i in batch.ids], use, transform)
        if use is not None
        else None,
    )


class _MinedDataset(IterableDataset):
    _pairs = False
    _data_kinds: Tuple[Optional[str], ...] = ("vectors", "inputs")
    _options: Any = MineOptions

    def __init__(
        self,
        address: str,
        collection: str,
        strategy: Any = "semi_hard",
        *,
        data: str = "vectors",
        label_ids: Optional[Mapping[str, int]] = None,
        transform: Optional[Transform] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        options: Any = None,
        **overrides: Any,
    ):
        super().__init__()
        if data not in self._data_kinds:
            raise ValueError("data is " + " or ".join(repr(k) for k in self._data_kinds))
        for key in ("shard", "with_vectors", "with_inputs"):
            if key in overrides:
                raise TypeError(f"{key} is set by the dataset")
        self.address = address
        self.collection = collection
        self.strategy = strategy
        self.data = data
        self.label_ids = dict(label_ids) if label_ids is not None else None
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.options = merge_options(self._options, options, overrides)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Mines epoch e with seed + e, so every epoch draws afresh (call it before
        iterating, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def _open(self, client: Client, opts: Any) -> Tuple[Any, Callable[..., Any]]:
        """This dataset's stream, and what turns its batches into tensors."""
        if self._pairs:
            return client.mine_pairs(self.collection, self.strategy, opts), pairs_to_tensors
        return client.mine_triplets(self.collection, self.strategy, opts), triplets_to_tensors

    def __iter__(self):
        index, count = current_shard(self.rank, self.world_size)
        opts = replace(self.options, seed=self.options.seed + self.epoch)
        if self.data is not None:
            use = "with_vectors" if self.data == "vectors" else "with_inputs"
            opts = replace(opts, **{use: True})
        if count > 1:
            opts = replace(opts, shard=(index, count))
        client = Client(self.address)
        try:
            stream, convert = self._open(client, opts)
            try:
                for batch in stream:
                    if len(batch):
                        yield convert(batch, self.data, self.label_ids, self.transform)
            finally:
                stream.cancel()
        finally:
            client.close()


class MinedTripletDataset(_MinedDataset):
    """One MineTriplets pass per epoch, as MinedTriplets batches.

    address: the daemon ("host:port"); each worker opens its own channel. strategy,
    options (a MineOptions) and options by name: as Client.mine_triplets (batch_size
    anchors per element, margin, seed, ...; shard, with_vectors and with_inputs are the
    dataset's to set; max_triplets bounds each shard, not the total). data: "vectors" (the
    stored vectors) or "inputs" (the stored inputs, through `transform`, default
    decode_input). label_ids: a fixed label -> int table; default: codes per batch.
    rank, world_size: default from torch.distributed.

    Use ``DataLoader(ds, batch_size=None, num_workers=N, multiprocessing_context="spawn")``
    (or "forkserver"): gRPC does not survive fork() in a process that already has a
    channel open.
    """


class MinedPairDataset(_MinedDataset):
    """One MinePairs pass per epoch, as MinedPairs batches (see MinedTripletDataset)."""

    _pairs = True


class NeighbourClassBatches(_MinedDataset):
    """MineBatches as a dataset: one pass per epoch (every item of this process's shard
    at least once), as NeighbourBatch elements of P x K items, for an in-batch miner.

    address: the daemon ("host:port"); each worker opens its own channel. classes (P),
    per_class (K), options (a BatchOptions) and the options by name neighbours, seed,
    min_generation, max_batches (per shard; 0 = one pass), expansion and candidates: as
    Client.mine_batches. data: None
    (ids and labels only), "vectors" (the stored vectors) or "inputs" (the stored
    inputs, through `transform`, default decode_input). label_ids: a fixed label -> int
    table; default: codes per batch, class j of the batch = j. rank, world_size: default
    from torch.distributed. set_epoch(e) mines with seed + e.

    Items are split by shard (rank * num_workers + worker id, of world_size *
    num_workers), so each worker's batches hold its own items only: a class of n items
    has about n / count of them in a shard, and gives all it has when that is under K.

    Use ``DataLoader(ds, batch_size=None, num_workers=N, multiprocessing_context="spawn")``.
    """

    _data_kinds = (None, "vectors", "inputs")
    _options = BatchOptions

    def __init__(
        self,
        address: str,
        collection: str,
        *,
        classes: Optional[int] = None,
        per_class: Optional[int] = None,
        data: Optional[str] = None,
        label_ids: Optional[Mapping[str, int]] = None,
        transform: Optional[Transform] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        options: Optional[BatchOptions] = None,
        **overrides: Any,
    ):
        # Given ones only, so that options' own P and K stand otherwise.
        for key, value in (("classes", classes), ("per_class", per_class)):
            if value is not None:
                overrides[key] = value
        super().__init__(
            address,
            collection,
            None,
            data=data,  # type: ignore[arg-type]
            label_ids=label_ids,
            transform=transform,
            rank=rank,
            world_size=world_size,
            options=options,
            **overrides,
        )

    def _open(self, client: Client, opts: Any) -> Tuple[Any, Callable[..., Any]]:
        return client.mine_batches(self.collection, opts), class_batch_to_tensors


@dataclass
class SessionTriplets:
    """One Session step's triplets against the trainer's own batch.

    Row r is (anchor_index[r], positive_index[r], negative_index[r]): the anchor is row
    anchor_index[r] of the embeddings the step sent (keep the grad: ``emb[a]``), the
    positive and negative are rows of `memory`, the stored vectors (or inputs) of the
    collection's items, each once. `labels` are the step's anchors' codes and
    `memory_labels` the memory's, from one table.

    pytorch-metric-learning: ``loss_fn(emb, b.labels, b.indices_tuple,
    ref_emb=b.memory, ref_labels=b.memory_labels)``. torch:
    ``F.triplet_margin_loss(emb[b.anchor_index], b.positives, b.negatives)``.
    """

    anchor_index: torch.Tensor  # (r,) int64 into the step's ids
    positive_index: torch.Tensor  # (r,) int64 into memory
    negative_index: torch.Tensor  # (r,) int64 into memory
    memory: torch.Tensor  # (u, d) or (u, *input shape)
    labels: torch.Tensor  # (n,) int64, the step's anchors; -1 where unknown
    memory_labels: torch.Tensor  # (u,) int64
    memory_ids: List[str]
    label_names: List[str]
    d_ap: torch.Tensor
    d_an: torch.Tensor
    step: int
    stats: Optional[MineStats] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.anchor_index)

    @property
    def indices_tuple(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.anchor_index, self.positive_index, self.negative_index

    @property
    def positives(self) -> torch.Tensor:
        return self.memory[self.positive_index]

    @property
    def negatives(self) -> torch.Tensor:
        return self.memory[self.negative_index]


class SessionFeed:
    """A Miner Session driven by the training loop.

    ::

        feed = SessionFeed(client, "faces", "semi_hard", margin=0.2)
        for ids, x, y in loader:
            emb = model(x)
            b = feed.step(ids, emb, labels=y_names)      # mined against the collection
            loss = F.triplet_margin_loss(emb[b.anchor_index], b.positives, b.negatives)
            ...
            client.upsert("faces", ids, emb.detach().cpu().numpy(), generation=step)
        feed.close()

    step(ids, embeddings): the anchors are the trainer's items (stored ids; new ids
    need `labels`), measured with its current embeddings; positives and negatives come
    from the collection (stored vectors, or stored inputs with data="inputs").
    strategy, options (a MineOptions) and options by name: as Client.session.
    """

    def __init__(
        self,
        client: Client,
        collection: str,
        strategy: Any = "semi_hard",
        *,
        data: str = "vectors",
        label_ids: Optional[Mapping[str, int]] = None,
        transform: Optional[Transform] = None,
        options: Optional[MineOptions] = None,
        **overrides: Any,
    ):
        if data not in ("vectors", "inputs"):
            raise ValueError('data is "vectors" or "inputs"')
        # Kept through update(): the feed needs the items' data.
        self._use = {"with_vectors" if data == "vectors" else "with_inputs": True}
        overrides.update(self._use)
        self.data = data
        self.label_ids = label_ids
        self.transform = transform
        self.session: Session = client.session(collection, strategy, options, **overrides)

    def step(
        self,
        ids: Sequence[str],
        embeddings: Any = None,
        labels: Optional[Sequence[str]] = None,
        step: Optional[int] = None,
    ) -> SessionTriplets:
        ids = list(ids)
        batch = self.session.step(ids, embeddings, labels=labels, step=step)
        position = {}
        for j, i in enumerate(ids):
            position.setdefault(i, j)
        memory_ids, index = _unique(
            batch.items, [x for row in zip(batch.positive_ids, batch.negative_ids) for x in row]
        )
        items = [batch.items[i] for i in memory_ids]
        coder = _Coder(self.label_ids)
        memory_labels = torch.tensor([coder(i.label) for i in items], dtype=torch.int64)
        anchor_labels = []
        for j, i in enumerate(ids):
            name = labels[j] if labels is not None and labels[j] else None
            if name is None and i in batch.items:
                name = batch.items[i].label
            anchor_labels.append(coder(name) if name is not None else -1)
        return SessionTriplets(
            anchor_index=torch.tensor([position[a] for a in batch.anchor_ids], dtype=torch.int64),
            positive_index=torch.tensor([index[p] for p in batch.positive_ids], dtype=torch.int64),
            negative_index=torch.tensor([index[n] for n in batch.negative_ids], dtype=torch.int64),
            memory=_data(items, self.data, self.transform),
            labels=torch.tensor(anchor_labels, dtype=torch.int64),
            memory_labels=memory_labels,
            memory_ids=memory_ids,
            label_names=coder.names,
            d_ap=torch.from_numpy(batch.d_ap),
            d_an=torch.from_numpy(batch.d_an),
            step=batch.step,
            stats=batch.stats,
        )

    def update(self, options: Optional[MineOptions] = None, **overrides: Any) -> None:
        """New mining options from the next step on (as Session.update)."""
        self.session.update(options, **overrides, **self._use)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "SessionFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class MemoryRefs:
    """One CollectionMemory step: the memory's items that the daemon mined for the
    step's batch, ready for a pytorch-metric-learning loss.

    `ref_emb[i]` is the stored vector of item `ref_ids[i]` (each mined positive and
    negative once; on the device and in the dtype of the step's embeddings) and
    `ref_labels[i]` its label's code; `labels` are the batch's own labels, coded with
    the same table. ``loss_fn(emb, r.labels, ref_emb=r.ref_emb, ref_labels=r.ref_labels)``
    lets the loss (or its miner) pair every row of the batch with every ref;
    ``indices_tuple`` holds the daemon's own triplets instead (anchors: rows of the
    batch; positives, negatives: rows of ref_emb). Empty (``len(r) == 0``) during the
    warm-up and when nothing was mined.
    """

    ref_emb: torch.Tensor  # (u, d)
    ref_labels: torch.Tensor  # (u,) int64
    labels: torch.Tensor  # (n,) int64, the batch's
    ref_ids: List[str]
    label_names: List[str]  # code -> label, when codes are per step
    anchor_index: torch.Tensor  # (r,) int64 into the batch
    positive_index: torch.Tensor  # (r,) int64 into ref_emb
    negative_index: torch.Tensor  # (r,) int64 into ref_emb
    step: int
    warming_up: bool
    # The last step whose write-back the daemon reported durable (None: none yet).
    written_step: Optional[int]
    seconds: float  # this step's round trip
    stats: Optional[MineStats] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ref_ids)

    @property
    def indices_tuple(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.anchor_index, self.positive_index, self.negative_index


class CollectionMemory:
    """A cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning",
    CVPR 2020) kept in a collection, over a Session whose every step writes back.

    ::

        mem = CollectionMemory(client, "faces", negatives_per_anchor=4, warmup=1000)
        loss_fn = losses.ContrastiveLoss()
        for step, (ids, x, names) in enumerate(loader):
            emb = model(x)
            r = mem.step(ids, emb, names, step)
            y = r.labels                       # the batch's labels, coded like the refs
            loss = loss_fn(emb, y)
            if len(r):
                loss = loss + loss_fn(emb, y, ref_emb=r.ref_emb, ref_labels=r.ref_labels)
            ...

    step(ids, embeddings, labels, step): sends the batch's fresh embeddings (detached
    and copied to the CPU here) as the step's anchors, labels by name; the daemon mines
    their positives and negatives among the collection's stored vectors (`strategy`,
    default "hard"; the options are the Session's: negatives_per_anchor,
    positives_per_anchor, min_generation to bound the memory's staleness, margin, ...),
    answers with their stored vectors and labels, and then writes the batch's vectors
    back with generation = step, durably before the next step is mined (and before
    close() returns, for the last step). Before step `warmup` the refs come back empty
    while the writes go on, so the memory fills with the model's embeddings before the
    loss uses it.

    `latencies` holds the round trip of each of the last `latency_window` steps, in
    seconds; `latency_summary()` their p50 and p99.
    """

    def __init__(
        self,
        client: Client,
        collection: str,
        strategy: Any = "hard",
        *,
        negatives_per_anchor: int = 4,
        positives_per_anchor: int = 1,
        min_generation: int = 0,
        warmup: int = 0,
        label_ids: Optional[Mapping[str, int]] = None,
        latency_window: int = 10_000,
        **options: Any,
    ):
        for key in ("with_vectors", "with_inputs", "anchors", "anchor_labels", "shard"):
            if key in options:
                raise TypeError(f"{key} is set by the memory")
        self.warmup = int(warmup)
        self.label_ids = dict(label_ids) if label_ids is not None else None
        self.latencies: Deque[float] = deque(maxlen=latency_window)
        self.stats: Optional[MineStats] = None
        self._next_step = 0
        self.session: Session = client.session(
            collection,
            strategy,
            negatives_per_anchor=negatives_per_anchor,
            positives_per_anchor=positives_per_anchor,
            min_generation=min_generation,
            with_vectors=True,
            **options,
        )

    @property
    def written_step(self) -> Optional[int]:
        """The last step whose write-back the daemon reported durable (None: none yet)."""
        return self.session.written_step

    def step(
        self,
        ids: Sequence[str],
        embeddings: Any,
        labels: Sequence[str],
        step: Optional[int] = None,
    ) -> MemoryRefs:
        """One training step: the batch's ids, its fresh (n, d) embeddings (a tensor;
        the graph is left alone) and its labels by name. Steps are numbered 0, 1, ...
        unless given."""
        ids = list(ids)
        if isinstance(labels, str) or isinstance(labels, torch.Tensor):
            raise TypeError("labels are the batch's label names, one str per item")
        labels = list(labels)
        if len(labels) != len(ids):
            raise ValueError(f"{len(labels)} labels for {len(ids)} ids")
        if not all(isinstance(name, str) and name for name in labels):
            raise ValueError("every item of the batch needs its label's name")
        if isinstance(embeddings, torch.Tensor):
            device, dtype = embeddings.device, embeddings.dtype
            vectors = embeddings.detach().to("cpu", torch.float32).numpy()
        else:
            vectors = np.asarray(embeddings, dtype=np.float32)
            device, dtype = torch.device("cpu"), torch.float32
        number = self._next_step if step is None else int(step)
        self._next_step = number + 1

        started = time.perf_counter()
        batch = self.session.step(ids, vectors, labels=labels, step=number, write_back=True)
        seconds = time.perf_counter() - started
        self.latencies.append(seconds)
        self.stats = batch.stats

        coder = _Coder(self.label_ids)
        codes = [coder(name) for name in labels]
        warming_up = number < self.warmup
        if warming_up:
            ref_ids: List[str] = []
            triplets: Tuple[List[str], List[str], List[str]] = ([], [], [])
        else:
            ref_ids, _ = _unique(
                batch.items, [x for row in zip(batch.positive_ids, batch.negative_ids) for x in row]
            )
            triplets = (batch.anchor_ids, batch.positive_ids, batch.negative_ids)
        refs = [batch.items[i] for i in ref_ids]
        index = {i: j for j, i in enumerate(ref_ids)}
        position: Dict[str, int] = {}
        for j, i in enumerate(ids):
            position.setdefault(i, j)
        ref_emb = _data(refs, "vectors", None) if refs else torch.zeros((0, vectors.shape[1]))

        def long(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return MemoryRefs(
            ref_emb=ref_emb.to(device=device, dtype=dtype),
            ref_labels=long([coder(i.label) for i in refs]),
            labels=long(codes),
            ref_ids=ref_ids,
            label_names=coder.names,
            anchor_index=long([position[a] for a in triplets[0]]),
            positive_index=long([index[p] for p in triplets[1]]),
            negative_index=long([index[n] for n in triplets[2]]),
            step=number,
            warming_up=warming_up,
            written_step=self.session.written_step,
            seconds=seconds,
            stats=batch.stats,
        )

    def latency_summary(self) -> Dict[str, float]:
        """The round trips of the steps in `latencies`: how many, and their p50, p99,
        mean and max in milliseconds."""
        if not self.latencies:
            return {"steps": 0}
        ms = np.asarray(self.latencies, dtype=np.float64) * 1000.0
        return {
            "steps": len(ms),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            "max_ms": float(ms.max()),
        }

    def update(self, options: Optional[MineOptions] = None, **overrides: Any) -> None:
        """New mining options from the next step on (as Session.update: strategy,
        min_generation, ...)."""
        self.session.update(options, **overrides, with_vectors=True)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "CollectionMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
