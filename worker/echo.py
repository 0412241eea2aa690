"""A near-zero-cost engine for testing and benchmarking the orchestration, never for real output.

It echoes each prompt back, with word counts standing in for tokens. Selected with
`--engine echo`; the model is never loaded. For an embedding job (issue 21) it gives each input a
unit vector that depends only on its text (ECHO_DIM long), with word counts for tokens.
"""

from __future__ import annotations

import time
import zlib
from typing import Iterator

import numpy as np

from llmbatch.worker.engine.types import Request, Result, Usage


ECHO_DIM = 384  # all-MiniLM-L6-v2's size


_TABLE = np.random.default_rng(0).standard_normal((4, 256, ECHO_DIM), dtype=np.float32)  # [byte, value, dim]


def echo_vector(x: str | list[int]) -> np.ndarray:
    """A unit vector from an input's CRC (a sum of one fixed random row per CRC byte): the same
    input always gets the same vector, at a few microseconds each."""
    key = x.encode() if isinstance(x, str) else np.asarray(x, dtype=np.int64).tobytes()
    crc = zlib.crc32(key)
    v = _TABLE[0, crc & 255] + _TABLE[1, (crc >> 8) & 255] + _TABLE[2, (crc >> 16) & 255] + _TABLE[3, crc >> 24]
    return v / np.linalg.norm(v)


class EchoEngine:
    batch_size = 64

    def _batches(self, requests: list, more, take: int) -> Iterator[list]:
        """`take` requests at a time, asking `more` whenever fewer than batch_size wait, until both run dry."""
        queue = list(requests)
        while queue or more is not None:
            if more is not None and len(queue) < self.batch_size:
                fresh = more()
                queue += fresh
                more = more if fresh else None
            batch, queue = queue[:take], queue[take:]
            if not batch:
                return
            yield batch

    def generate(self, requests: list[Request], more=None, cancelled=None) -> Iterator[list[Result]]:
        for batch in self._batches(requests, more, self.batch_size):
            started = time.time()
            out = []
            gone = cancelled() if cancelled is not None else ()
            if gone:  # as the real engine: a dropped request comes back cancelled
                out = [Result(id=r.id, finish_reason="cancelled", error_code="cancelled", started_at=started,
                              finished_at=started) for r in batch if r.id in gone]
                batch = [r for r in batch if r.id not in gone]
            for r in batch:
                text = r.prompt if r.prompt is not None else (r.messages or [{}])[-1].get("content", "")
                words = text.split()[: r.params.max_tokens]
                out.append(Result(id=r.id, output=" ".join(words),
                                  finish_reason="stop" if len(words) < r.params.max_tokens else "length",
                                  usage=Usage(len(text.split()), len(words)), started_at=started,
                                  finished_at=time.time()))
            yield out

    def embed(self, requests, more=None):
        from llmbatch.worker.embedder import EmbedResult, truncate_np

        # Vectors are cheap: results go back in micro-batches of 8 x batch_size rows.
        for batch in self._batches(requests, more, 8 * self.batch_size):
            started = time.time()
            out = []
            for r in batch:
                vectors = truncate_np(np.stack([echo_vector(x) for x in r.inputs]), r.dimensions)
                tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in r.inputs)
                out.append(EmbedResult(r.id, vectors=vectors, usage=Usage(tokens, 0), started_at=started,
                                       finished_at=time.time()))
            yield out
