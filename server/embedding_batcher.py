"""Group-commit batching of instruction-embedding calls made from many threads.

Each chat request resolves its instruction in a worker thread. A MiniLM encode call has a
large fixed cost: encoding a dozen texts in one call costs about as much CPU as encoding one
(`bench/README.md`, History), so under concurrent load one encode per request would spend
most of that CPU on per-call overhead, on the same cores that run the engine.

`BatchedEncoder.encode_one` therefore queues the text; the first caller that finds no
encode in flight becomes the leader, takes everything queued (up to `max_batch`) and
encodes it in one call outside the lock, while later callers wait for their results. A
lone request is encoded at once (no timer, no added latency); requests arriving while an
encode runs share the next one. Only one encode runs at a time, so the encoder itself
(whose LRU cache is not thread-safe) is never called concurrently. An encoder error is
raised in every caller whose text was in the failed batch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


class Embedder(Protocol):
    """Anything that turns texts into `[n, 384]` embeddings (e.g. `InstructionEncoder`)."""

    def encode(self, texts: Sequence[str]) -> Tensor: ...


@dataclass
class _Pending:
    text: str
    result: Tensor | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class BatchedEncoder:
    """Thread-safe `encode_one` over an `Embedder`, batching concurrent callers.

    Args:
        embedder: the encoder; only ever called from one thread at a time.
        max_batch: most texts encoded in one call.

    Attributes:
        calls: how many `encode` calls were made (for tests and metrics).
    """

    def __init__(self, embedder: Embedder, max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.embedder = embedder
        self.max_batch = max_batch
        self.calls = 0
        self._cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._busy = False

    def encode_one(self, text: str) -> Tensor:
        """`[384]` embedding of `text`, encoded together with any texts queued meanwhile."""
        mine = _Pending(text)
        with self._cv:
            self._queue.append(mine)
        while True:
            with self._cv:
                while not mine.done and self._busy:
                    self._cv.wait()
                if mine.done:
                    return self._outcome(mine)
                batch = self._queue[: self.max_batch]
                del self._queue[: len(batch)]
                self._busy = True
            self._run(
                batch
            )  # the leader encodes outside the lock; its own text may be in a later batch

    def _run(self, batch: list[_Pending]) -> None:
        try:
            out = self.embedder.encode([p.text for p in batch])
            if out.shape[0] != len(batch):
                raise RuntimeError(
                    f"encoder returned {out.shape[0]} embeddings for {len(batch)} texts"
                )
            results: list[Tensor | None] = list(out)
            error: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter of this batch
            results, error = [None] * len(batch), exc
        with self._cv:
            self.calls += 1
            for p, r in zip(batch, results):
                p.result, p.error = r, error
            self._busy = False
            self._cv.notify_all()

    @staticmethod
    def _outcome(p: _Pending) -> Tensor:
        if p.error is not None:
            raise p.error
        assert p.result is not None
        return p.result
