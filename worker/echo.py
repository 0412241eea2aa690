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

    def generate(self, requests: list[Request]) -> Iterator[list[Result]]:
        for i in range(0, len(requests), self.batch_size):
            started = time.time()
            out = []
            for r in requests[i:i + self.batch_size]:
                text = r.prompt if r.prompt is not None else (r.messages or [{}])[-1].get("content", "")
                words = text.split()[: r.params.max_tokens]
                out.append(Result(id=r.id, output=" ".join(words),
                                  finish_reason="stop" if len(words) < r.params.max_tokens else "length",
                                  usage=Usage(len(text.split()), len(words)), started_at=started,
                                  finished_at=time.time()))
            yield out
