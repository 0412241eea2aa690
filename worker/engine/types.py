"""What the engine takes and returns. Plain data: no torch, no Celery, no database."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        d = dict(d)
        if "stop" in d:
            stop = d["stop"]
            d["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and v is not None})


@dataclass
class Request:
    id: Any  # the caller's key, handed back on the result
    prompt: str | None = None  # raw text, no template
    messages: list[dict[str, str]] | None = None  # chat: the model's template is applied
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Usage:
    prompt_tokens: int = 0  # padding excluded
    completion_tokens: int = 0  # up to and including the stop token

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Result:
    id: Any
    output: str | None = None
    finish_reason: str | None = None  # "stop" | "length"; None on error
    usage: Usage = field(default_factory=Usage)
    error_code: str | None = None  # context_length_exceeded, invalid_request, out_of_memory, engine_error
    error_message: str | None = None
    started_at: float = 0.0  # time.time() when its batch started
    finished_at: float = 0.0
    token_ids: list[int] = field(default_factory=list)  # generated ids, the stop token included
    warning: str | None = None  # a note on a result that is not an error (max_tokens cut by the context)

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @classmethod
    def failure(cls, request_id: Any, code: str, message: str, started_at: float = 0.0,
                usage: Usage | None = None) -> "Result":
        import time

        now = time.time()
        return cls(id=request_id, error_code=code, error_message=message, usage=usage or Usage(),
                   started_at=started_at or now, finished_at=now)
