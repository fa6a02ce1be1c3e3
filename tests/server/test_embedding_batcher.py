"""Group-commit batching of embedding calls: concurrent callers share encode calls, each gets
the embedding of its own text, the encoder never runs twice at once, errors reach every
caller of the failed batch, and a lone caller is encoded at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from smolora.server.embedding_batcher import BatchedEncoder
from tests.server.api.helpers import HashingEmbedder


class SlowRecordingEmbedder:
    """HashingEmbedder that takes `delay` seconds per call and records batches and overlap."""

    def __init__(self, delay: float, fail_on: str | None = None) -> None:
        self.inner = HashingEmbedder()
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.batches.append(list(texts))
        try:
            time.sleep(self.delay)
            if self.fail_on is not None and self.fail_on in texts:
                raise RuntimeError("encoder failed")
            return self.inner.encode(texts)
        finally:
            with self._lock:
                self.active -= 1


def _concurrently(encoder: BatchedEncoder, texts: list[str]) -> list[torch.Tensor | BaseException]:
    start = threading.Barrier(len(texts))

    def one(text: str) -> torch.Tensor | BaseException:
        start.wait()
        try:
            return encoder.encode_one(text)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            return exc

    with ThreadPoolExecutor(len(texts)) as pool:
        return list(pool.map(one, texts))


def test_concurrent_callers_share_encode_calls_and_get_their_own_embedding() -> None:
    emb = SlowRecordingEmbedder(delay=0.05)
    encoder = BatchedEncoder(emb)
    texts = [f"Answer question {i} in one word." for i in range(16)]
    results = _concurrently(encoder, texts)
    expected = HashingEmbedder().encode(texts)
    for text, got, want in zip(texts, results, expected):
        assert isinstance(got, torch.Tensor), text
        torch.testing.assert_close(got, want)
    assert emb.max_active == 1, "the encoder ran concurrently"
    assert sorted(t for b in emb.batches for t in b) == sorted(
        texts
    )  # every text encoded exactly once
    assert encoder.calls == len(emb.batches) < len(texts)
    assert max(len(b) for b in emb.batches) > 1


def test_max_batch_caps_one_encode_call() -> None:
    emb = SlowRecordingEmbedder(delay=0.05)
    encoder = BatchedEncoder(emb, max_batch=3)
    texts = [f"text {i}" for i in range(10)]
    results = _concurrently(encoder, texts)
    assert all(isinstance(r, torch.Tensor) for r in results)
    assert max(len(b) for b in emb.batches) <= 3
    assert sorted(t for b in emb.batches for t in b) == sorted(texts)


def test_an_encoder_error_reaches_every_caller_of_that_batch_only() -> None:
    emb = SlowRecordingEmbedder(delay=0.05, fail_on="bad")
    encoder = BatchedEncoder(emb)
    texts = ["bad"] + [f"good {i}" for i in range(7)]
    results = _concurrently(encoder, texts)
    failed_batch = next(b for b in emb.batches if "bad" in b)
    for text, r in zip(texts, results):
        if text in failed_batch:
            assert isinstance(r, RuntimeError) and "encoder failed" in str(r)
        else:
            assert isinstance(r, torch.Tensor)
    # the encoder is usable afterwards
    torch.testing.assert_close(
        encoder.encode_one("good again"), HashingEmbedder().encode(["good again"])[0]
    )


def test_a_lone_caller_is_encoded_at_once() -> None:
    emb = SlowRecordingEmbedder(delay=0.0)
    encoder = BatchedEncoder(emb)
    out = encoder.encode_one("Describe the image.")
    torch.testing.assert_close(out, HashingEmbedder().encode(["Describe the image."])[0])
    assert emb.batches == [["Describe the image."]]


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatchedEncoder(HashingEmbedder(), max_batch=0)
