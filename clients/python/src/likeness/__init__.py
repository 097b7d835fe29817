"""likeness: a Python client for the likeness similarity daemon.

    import likeness
    with likeness.Client("127.0.0.1:50051") as c:
        c.create_collection("faces", dimension=128, metric="cosine")
        c.upsert("faces", ids, vectors, labels=labels, progress=True)
        hits = c.search("faces", vectors[0], k=5)

Mining for training: `Client.mine_triplets`, `Client.mine_pairs`, `Client.mine_batches`,
`Client.session` (options: `MineOptions`, `BatchOptions`); PyTorch datasets and a
cross-batch memory over them in `likeness.torch` (the `likeness[torch]` extra). The
same client on asyncio: `likeness.aio.Client`. Retries: `Retry`.
"""

from likeness._convert import image_input, tensor_input
from likeness.client import Client
from likeness.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LikenessError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from likeness.mining import (
    BatchOptions,
    ClassBatch,
    ClassBatchStream,
    MinedItem,
    MineOptions,
    MineStats,
    PairBatch,
    PairStream,
    Session,
    TripletBatch,
    TripletStream,
    fnv1a,
    shard_of,
)
from likeness.retry import Retry
from likeness.types import (
    Activation,
    BatchSearchResult,
    Calibration,
    Classification,
    CollectionInfo,
    Items,
    ModelInfo,
    SearchResult,
    Verification,
    Vote,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Retry",
    "MineOptions",
    "BatchOptions",
    "image_input",
    "tensor_input",
    "LikenessError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "Internal",
    "ClassBatch",
    "ClassBatchStream",
    "MinedItem",
    "MineStats",
    "PairBatch",
    "PairStream",
    "Session",
    "TripletBatch",
    "TripletStream",
    "fnv1a",
    "shard_of",
    "Activation",
    "BatchSearchResult",
    "Calibration",
    "Classification",
    "CollectionInfo",
    "Items",
    "ModelInfo",
    "SearchResult",
    "Verification",
    "Vote",
]
