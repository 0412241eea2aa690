"""What the engine takes and returns. Plain data: no torch, no Celery, no database."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
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
    # issue 10: the rest of the OpenAI request. Plain hashable values, so params stay a frozen value.
    response_format: str = "text"  # text | json_object | json_schema
    json_schema: str | None = None  # the schema as JSON text, keys in the user's order: properties come out in it
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, 0-20
    n: int = 1  # choices for this request, all decoded from one prefill
    frequency_penalty: float = 0.0  # OpenAI: minus penalty x times the token was generated
    presence_penalty: float = 0.0  # OpenAI: minus penalty once the token was generated
    repetition_penalty: float = 1.0  # transformers: divide (or multiply, if < 0) logits of seen tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        d = dict(d)
        if "stop" in d:
            stop = d["stop"]
            d["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        rf = d.pop("response_format", None)  # issue 10: the OpenAI object as stored by jobs/inputs.py
        if isinstance(rf, dict):
            d["response_format"] = rf.get("type", "text")
            if rf.get("type") == "json_schema":
                d["json_schema"] = json.dumps(rf["json_schema"].get("schema", {}))
        if isinstance(d.get("logit_bias"), dict):
            d["logit_bias"] = tuple(sorted((int(k), float(v)) for k, v in d["logit_bias"].items()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and v is not None})

    @property
    def uses_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)

    def for_choice(self, i: int) -> "SamplingParams":
        """Choice i's params: n=1, and for a seeded line a seed derived from (seed, i), so the choices
        differ from each other yet repeat run after run. Choice 0 keeps the line's own seed."""
        if i == 0 or self.seed is None:
            return replace(self, n=1)
        digest = hashlib.blake2b(f"{self.seed}:{i}".encode(), digest_size=8).digest()
        return replace(self, n=1, seed=int.from_bytes(digest, "little") >> 1)  # < 2**63


@dataclass
class Request:
    id: Any  # the caller's key, handed back on the result
    prompt: str | None = None  # raw text, no template
    messages: list[dict[str, str]] | None = None  # chat: the model's template is applied
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a PEFT LoRA adapter (local path or hub id) to run it with; None = the base


@dataclass
class Usage:
    prompt_tokens: int = 0  # padding excluded
    completion_tokens: int = 0  # up to and including the stop token
    cached_tokens: int = 0  # of prompt_tokens, those taken from a shared prefix

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
    # issue 10. logprobs: one entry per generated token of the first choice, when asked for:
    # {"token", "logprob", "top_logprobs": [{"token", "logprob"}]}. choices: choices 1..n-1 (n > 1);
    # usage.completion_tokens counts every choice.
    logprobs: list[dict] | None = None
    choices: list["Choice"] = field(default_factory=list)
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


@dataclass
class Choice:
    """One more choice of an n > 1 request (the first is the Result's own output)."""

    output: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[dict] | None = None
    token_ids: list[int] = field(default_factory=list)
