"""What the client returns: plain dataclasses with numpy arrays, built from the replies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from likeness._convert import METRICS, PRECISIONS, enum_name, stack_vectors
from likeness.v1 import likeness_pb2 as pb


@dataclass(frozen=True)
class Activation:
    """A collection's switch to another model (Models.Activate): `state` is
    "running", "done" or "failed" (with `error`)."""

    state: str
    model: str
    version: str
    done: int
    total: int
    rate: float  # items re-embedded per second
    error: str

    @classmethod
    def from_pb(cls, a: pb.Activation) -> "Activation":
        return cls(
            state=pb.Activation.State.Name(a.state).lower(),
            model=a.model,
            version=a.version,
            done=a.done,
            total=a.total,
            rate=a.rate,
            error=a.error,
        )


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    dimension: int
    metric: str  # "cosine", "l2" or "inner_product"
    precision: str  # "f32", "f16" or "i8"
    count: int
    model: str
    pair_model: str
    keep_inputs: bool
    connectivity: int
    expansion_add: int
    expansion_search: int
    dbl_margin: float
    dbl_scale: float
    threshold: float
    pair_threshold: Optional[float]
    model_version: str = ""  # the published version of `model`; "" = as loaded at start
    activation: Optional[Activation] = None  # the latest Models.Activate, if any

    @classmethod
    def from_pb(cls, c: pb.CollectionInfo) -> "CollectionInfo":
        return cls(
            name=c.name,
            dimension=c.dimension,
            metric=enum_name(c.metric, METRICS),
            precision=enum_name(c.precision, PRECISIONS),
            count=c.count,
            model=c.model,
            pair_model=c.pair_model,
            keep_inputs=c.keep_inputs,
            connectivity=c.index.connectivity,
            expansion_add=c.index.expansion_add,
            expansion_search=c.index.expansion_search,
            dbl_margin=c.dbl_margin,
            dbl_scale=c.dbl_scale,
            threshold=c.threshold,
            pair_threshold=c.pair_threshold if c.HasField("pair_threshold") else None,
            model_version=c.model_version,
            activation=Activation.from_pb(c.activation) if c.HasField("activation") else None,
        )


@dataclass
class Items:
    """The items Get found, in request order (unknown ids are left out)."""

    ids: List[str]
    labels: List[str]
    metadata: List[Dict[str, str]]
    generations: np.ndarray  # (n,) uint64
    vectors: Optional[np.ndarray]  # (n, d) float32 with with_vectors
    inputs: Optional[List[pb.Input]]  # with with_inputs

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_pb(cls, r: pb.GetResponse, with_vectors: bool, with_inputs: bool) -> "Items":
        items = r.items
        return cls(
            ids=[i.id for i in items],
            labels=[i.label for i in items],
            metadata=[dict(i.metadata) for i in items],
            generations=np.array([i.generation for i in items], dtype=np.uint64),
            vectors=stack_vectors([i.vector for i in items]) if with_vectors else None,
            inputs=[i.input for i in items] if with_inputs else None,
        )


@dataclass
class SearchResult:
    """One query's hits, nearest first (or by pair score when re-ranked)."""

    ids: List[str]
    labels: List[str]
    distances: np.ndarray  # (n,) float32
    vectors: Optional[np.ndarray] = None  # (n, d) float32 with with_vectors
    metadata: Optional[List[Dict[str, str]]] = None  # with with_metadata
    pair_scores: Optional[np.ndarray] = None  # (n,) float32 when re-ranked; NaN: unscored

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_pb(
        cls, r: pb.SearchResponse, with_vectors: bool, with_metadata: bool, reranked: bool
    ) -> "SearchResult":
        hits = r.hits
        return cls(
            ids=[h.id for h in hits],
            labels=[h.label for h in hits],
            distances=np.array([h.distance for h in hits], dtype=np.float32),
            vectors=stack_vectors([h.vector for h in hits]) if with_vectors else None,
            metadata=[dict(h.metadata) for h in hits] if with_metadata else None,
            pair_scores=np.array(
                [h.pair_score if h.HasField("pair_score") else np.nan for h in hits],
                dtype=np.float32,
            )
            if reranked
            else None,
        )


@dataclass
class BatchSearchResult:
    """SearchBatch's answers as (queries, k) arrays. A query with fewer than k hits is
    padded: id and label "", distance +inf (and vector NaN); `counts` says how many are
    real. `results[i]` is query i's unpadded SearchResult."""

    ids: np.ndarray  # (q, k) object (str)
    labels: np.ndarray  # (q, k) object (str)
    distances: np.ndarray  # (q, k) float32
    counts: np.ndarray  # (q,) int64
    vectors: Optional[np.ndarray]  # (q, k, d) float32 with with_vectors
    results: List[SearchResult] = field(repr=False)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> SearchResult:
        return self.results[i]

    @classmethod
    def from_results(cls, results: Sequence[SearchResult], k: int) -> "BatchSearchResult":
        q = len(results)
        ids = np.full((q, k), "", dtype=object)
        labels = np.full((q, k), "", dtype=object)
        distances = np.full((q, k), np.inf, dtype=np.float32)
        counts = np.array([len(r) for r in results], dtype=np.int64)
        dims = {r.vectors.shape[1] for r in results if r.vectors is not None and len(r)}
        vectors = None
        if any(r.vectors is not None for r in results):
            d = dims.pop() if dims else 0
            vectors = np.full((q, k, d), np.nan, dtype=np.float32)
        for i, r in enumerate(results):
            n = len(r)
            ids[i, :n] = r.ids
            labels[i, :n] = r.labels
            distances[i, :n] = r.distances
            if vectors is not None and n:
                vectors[i, :n] = r.vectors
        return cls(ids, labels, distances, counts, vectors, list(results))


@dataclass(frozen=True)
class Vote:
    label: str
    weight: float
    count: int


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    votes: List[Vote]

    @classmethod
    def from_pb(cls, r: pb.ClassifyResponse) -> "Classification":
        votes = [Vote(v.label, v.weight, v.count) for v in r.votes]
        return cls(r.label, r.confidence, votes)


@dataclass(frozen=True)
class Verification:
    distance: float
    similarity: float
    probability: float
    same: bool
    pair_score: Optional[float]

    @classmethod
    def from_pb(cls, r: pb.VerifyResponse) -> "Verification":
        score = r.pair_score if r.HasField("pair_score") else None
        return cls(r.distance, r.similarity, r.probability, r.same, score)


@dataclass(frozen=True)
class Calibration:
    dbl_margin: float
    dbl_scale: float
    threshold: float
    accuracy: float
    roc_auc: float
    pairs: int
    pair_threshold: Optional[float]
    pair_accuracy: float
    pair_roc_auc: float

    @classmethod
    def from_pb(cls, r: pb.CalibrateResponse) -> "Calibration":
        return cls(
            dbl_margin=r.dbl_margin,
            dbl_scale=r.dbl_scale,
            threshold=r.threshold,
            accuracy=r.accuracy,
            roc_auc=r.roc_auc,
            pairs=r.pairs,
            pair_threshold=r.pair_threshold if r.HasField("pair_threshold") else None,
            pair_accuracy=r.pair_accuracy,
            pair_roc_auc=r.pair_roc_auc,
        )


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model. `towers` and `pair` are the proto's messages (input specs)."""

    name: str
    version: str
    kind: str  # "embedder" or "pair"
    dimension: int
    execution_provider: str
    towers: List[pb.TowerInfo]
    pair: Optional[pb.PairInfo]

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> "ModelInfo":
        return cls(
            name=m.name,
            version=m.version,
            kind=m.kind,
            dimension=m.dimension,
            execution_provider=m.execution_provider,
            towers=list(m.towers),
            pair=m.pair if m.HasField("pair") else None,
        )
