"""Python values to the proto's messages: queries, inputs, enums, filters."""

from __future__ import annotations

import io
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from likeness.v1 import likeness_pb2 as pb

METRICS = {"cosine": pb.COSINE, "l2": pb.L2, "inner_product": pb.INNER_PRODUCT}
PRECISIONS = {"f32": pb.F32, "f16": pb.F16, "i8": pb.I8}
STRATEGIES = {
    "random": pb.RANDOM,
    "hard": pb.HARD,
    "semi_hard": pb.SEMI_HARD,
    "distance_weighted": pb.DISTANCE_WEIGHTED,
    "batch_hard": pb.BATCH_HARD,
    "multi_similarity": pb.MULTI_SIMILARITY,
}


def enum(value: Union[str, int, None], table: Mapping[str, int], what: str) -> int:
    """A name ("semi-hard", "SEMI_HARD", "semi_hard") or the proto's number; None is 0."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    key = str(value).strip().lower().replace("-", "_")
    if key not in table:
        raise ValueError(f"unknown {what} {value!r}; one of {', '.join(table)}")
    return table[key]


def enum_name(value: int, table: Mapping[str, int]) -> str:
    for name, number in table.items():
        if number == value:
            return name
    return "unspecified"


def is_pil_image(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "save")


def image_input(image: Any, tower: str = "") -> pb.Input:
    """An image input: encoded bytes (PNG, JPEG, WebP, BMP, GIF) or a PIL image (sent as PNG)."""
    if is_pil_image(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(f"an image is bytes or a PIL image, not {type(image).__name__}")
    return pb.Input(image=bytes(image), tower=tower)


def tensor_input(array: Any, tower: str = "") -> pb.Input:
    """A raw tensor input (without the batch axis), sent as float32."""
    a = np.asarray(array, dtype=np.float32)
    return pb.Input(tensor=pb.Tensor(shape=list(a.shape), values=a.ravel().tolist()), tower=tower)


def to_input(x: Any, tower: str = "") -> pb.Input:
    """bytes or a PIL image: an image; a numpy array: a tensor; an Input: as it is."""
    if isinstance(x, pb.Input):
        return x
    if isinstance(x, (bytes, bytearray, memoryview)) or is_pil_image(x):
        return image_input(x, tower)
    if isinstance(x, np.ndarray):
        return tensor_input(x, tower)
    raise TypeError(
        f"an input is bytes, a PIL image, a numpy array or a likeness Input, not {type(x).__name__}"
    )


def to_query(q: Any) -> pb.Query:
    """A str: a stored item's id; a 1-D array or list of numbers: a vector; bytes, a PIL
    image or an Input (see image_input, tensor_input): an input the collection's model
    embeds."""
    if isinstance(q, pb.Query):
        return q
    if isinstance(q, str):
        return pb.Query(id=q)
    if isinstance(q, (pb.Input, bytes, bytearray, memoryview)) or is_pil_image(q):
        return pb.Query(input=to_input(q))
    v = np.asarray(q, dtype=np.float32)
    if v.ndim != 1:
        raise ValueError(f"a vector query is 1-D, got shape {v.shape}")
    return pb.Query(vector=pb.Vector(values=v.tolist()))


def to_queries(queries: Any) -> list:
    """A 2-D array: one vector query per row; otherwise a sequence of queries."""
    if isinstance(queries, np.ndarray):
        if queries.ndim != 2:
            raise ValueError(f"vector queries are a 2-D array, got shape {queries.shape}")
        m = np.asarray(queries, dtype=np.float32)
        return [pb.Query(vector=pb.Vector(values=row)) for row in m.tolist()]
    return [to_query(q) for q in queries]


def to_filter(
    labels: Optional[Sequence[str]],
    exclude_labels: Optional[Sequence[str]],
    metadata: Optional[Mapping[str, str]],
) -> Optional[pb.Filter]:
    if not labels and not exclude_labels and not metadata:
        return None
    if isinstance(labels, str) or isinstance(exclude_labels, str):
        raise TypeError("labels and exclude_labels are lists of labels, not one string")
    return pb.Filter(
        labels=list(labels or []),
        exclude_labels=list(exclude_labels or []),
        metadata=dict(metadata or {}),
    )


def matrix(values: Any, what: str) -> np.ndarray:
    m = np.asarray(values, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"{what} is a 2-D array (n, dimension), got shape {m.shape}")
    return m


def stack_vectors(rows: Sequence[Sequence[float]], dimension: int = 0) -> np.ndarray:
    """Rows of repeated floats as an (n, d) float32 array; (0, dimension) when empty."""
    if not rows:
        return np.zeros((0, dimension), dtype=np.float32)
    return np.array([list(r) for r in rows], dtype=np.float32)
