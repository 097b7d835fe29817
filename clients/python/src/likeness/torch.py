"""PyTorch datasets over likeness's miner (the `likeness[torch]` extra).

- MinedTripletDataset / MinedPairDataset: IterableDatasets over one MineTriplets /
  MinePairs pass per epoch. Each DataLoader worker of each torch.distributed rank mines
  its own shard of the anchors (shard index = rank * num_workers + worker_id, count =
  world_size * num_workers), so a multi-GPU job sees disjoint anchors that together
  cover all of them. Use them with ``DataLoader(dataset, batch_size=None)``: each
  element is already a batch (one mined message).
- SessionFeed: a Miner Session the training loop drives itself, one ``step(ids,
  embeddings)`` per training step; it is not a Dataset, because what it mines depends on
  the trainer's current embeddings, which live in the training process.

Every batch holds each item it uses once, in `data` (the stored vectors, or the stored
inputs with ``data="inputs"``), with integer `labels`, and `indices_tuple` into it: the
form pytorch-metric-learning's losses take (``loss(model(b.data), b.labels,
b.indices_tuple)``), and plain torch losses index it (``b.anchors``, ...).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from likeness.client import Client
from likeness.mining import MinedItem, MineStats, PairBatch, Session, TripletBatch
from likeness.v1 import likeness_pb2 as pb

__all__ = [
    "MinedTriplets",
    "MinedPairs",
    "SessionTriplets",
    "MinedTripletDataset",
    "MinedPairDataset",
    "SessionFeed",
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


class _MinedDataset(IterableDataset):
    _pairs = False

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
        **options: Any,
    ):
        super().__init__()
        if data not in ("vectors", "inputs"):
            raise ValueError('data is "vectors" or "inputs"')
        for key in ("shard", "with_vectors", "with_inputs"):
            if key in options:
                raise TypeError(f"{key} is set by the dataset")
        self.address = address
        self.collection = collection
        self.strategy = strategy
        self.data = data
        self.label_ids = dict(label_ids) if label_ids is not None else None
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.options = options
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Mines epoch e with seed + e, so every epoch draws afresh (call it before
        iterating, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def __iter__(self):
        index, count = current_shard(self.rank, self.world_size)
        opts = dict(self.options)
        opts["seed"] = int(opts.get("seed", 0)) + self.epoch
        opts["with_vectors" if self.data == "vectors" else "with_inputs"] = True
        if count > 1:
            opts["shard"] = (index, count)
        client = Client(self.address)
        try:
            if self._pairs:
                stream = client.mine_pairs(self.collection, self.strategy, **opts)
                convert = pairs_to_tensors
            else:
                stream = client.mine_triplets(self.collection, self.strategy, **opts)
                convert = triplets_to_tensors
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

    address: the daemon ("host:port"); each worker opens its own channel. strategy and
    options: as Client.mine_triplets (batch_size anchors per element, margin, seed, ...;
    shard, with_vectors and with_inputs are the dataset's to set; max_triplets bounds
    each shard, not the total). data: "vectors" (the
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
        **options: Any,
    ):
        if data not in ("vectors", "inputs"):
            raise ValueError('data is "vectors" or "inputs"')
        options["with_vectors" if data == "vectors" else "with_inputs"] = True
        self.data = data
        self.label_ids = label_ids
        self.transform = transform
        self.session: Session = client.session(collection, strategy, **options)

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

    def update(self, **options: Any) -> None:
        """New mining options from the next step on."""
        self.session.update(**options)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "SessionFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
