"""A near-zero-cost engine for testing and benchmarking the orchestration, never for real output.

It echoes each prompt back, with word counts standing in for tokens. Selected with
`--engine echo`; the model is never loaded.
"""

from __future__ import annotations

import time
from typing import Iterator

from llmbatch.worker.engine.types import Request, Result, Usage


class EchoEngine:
    batch_size = 64

    def generate(self, requests: list[Request], more=None, cancelled=None) -> Iterator[list[Result]]:
        queue = list(requests)
        while queue or more is not None:
            if more is not None and len(queue) < self.batch_size:
                fresh = more()
                queue += fresh
                more = more if fresh else None
            batch, queue = queue[:self.batch_size], queue[self.batch_size:]
            if not batch:
                return
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
