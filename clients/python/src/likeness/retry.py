"""Retry: when and how long to wait before calling again after a transient failure."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import FrozenSet, Optional

import grpc

__all__ = ["Retry", "DEFAULT_RETRY"]

TRANSIENT: FrozenSet[grpc.StatusCode] = frozenset(
    (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
)


@dataclass(frozen=True)
class Retry:
    """A retry policy: exponential backoff with jitter, a cap, and a maximum number of
    attempts.

    A call that fails with one of `codes` is tried again, up to `max_attempts` tries in
    all. The n-th wait is ``min(max_backoff, initial_backoff * multiplier ** (n - 1))``,
    shortened by a random fraction of at most `jitter` so that clients spread out.
    Reads are retried; writes (create, delete, upsert, calibrate, publish, activate)
    only with ``writes=True``, since a write that failed may still have been applied.
    Mining streams and Sessions are not retried. Each attempt gets the client's full
    `timeout`.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1  # seconds
    max_backoff: float = 5.0  # seconds
    multiplier: float = 2.0
    jitter: float = 0.2  # 0: exact waits; 1: anywhere between 0 and the wait
    writes: bool = False
    codes: FrozenSet[grpc.StatusCode] = TRANSIENT

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter is a fraction between 0 and 1")

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (from 1), jitter included."""
        wait = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return wait * (1.0 - self.jitter * random.random())

    def pause(self, code: grpc.StatusCode, attempt: int, write: bool) -> Optional[float]:
        """How long to wait before trying again after `attempt` failed with `code`; None:
        give up (a code not retried, a write without ``writes``, or no attempts left)."""
        if code not in self.codes or (write and not self.writes):
            return None
        if attempt >= self.max_attempts:
            return None
        return self.backoff(attempt)


DEFAULT_RETRY = Retry()
