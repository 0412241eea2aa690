"""LangChain adapters (`pip install llmbatch[langchain]`): a bulk call is one llmbatch job.

- `LLMBatchEmbeddings` (langchain_core Embeddings): `embed_documents` submits every text as one
  embedding job and returns the vectors in input order.
- `ChatLLMBatch` (langchain_core BaseChatModel): `batch()` submits every input as one generation
  job; `invoke()` is a job of one line.

Both run through llmbatch's HTTP Batches API when given `base_url`, else in this process against
the local database (see client.py for why both).
"""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field

from .client import chat, embed, make_client

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


class LLMBatchEmbeddings(Embeddings):
    def __init__(self, *, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 dimensions: int | None = None, database_url: str | None = None, progress: bool = True,
                 client=None):
        self.client = client or make_client(base_url, api_key, model, database_url, progress)
        self.dimensions = dimensions

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return embed(self.client, texts, self.dimensions)

    def embed_query(self, text: str) -> list[float]:
        return embed(self.client, [text], self.dimensions)[0]


def to_openai_messages(messages: list[BaseMessage]) -> list[dict]:
    out = []
    for m in messages:
        role = _ROLES.get(m.type)
        if role is None:
            raise ValueError(f"llmbatch takes system, human and ai messages, got a {m.type!r} message")
        out.append({"role": role, "content": m.text if hasattr(m, "text") and isinstance(m.text, str) else m.content})
    return out


class ChatLLMBatch(BaseChatModel):
    """A chat model served by llmbatch; `batch()` is one job for all its inputs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    database_url: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    progress: bool = True
    client: Any = Field(default=None, exclude=True)

    def model_post_init(self, __context: Any) -> None:
        if self.client is None:
            self.client = make_client(self.base_url, self.api_key, self.model, self.database_url, self.progress)

    @property
    def _llm_type(self) -> str:
        return "llmbatch"

    def _params(self, stop: list[str] | None) -> dict:
        params = {k: v for k, v in (("max_tokens", self.max_tokens), ("temperature", self.temperature)) if v is not None}
        return {**params, "stop": stop} if stop else params

    @staticmethod
    def _result(body: dict) -> ChatResult:
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        message = AIMessage(content=choice["message"]["content"] or "",
                            response_metadata={"finish_reason": choice["finish_reason"], "model_name": body["model"]},
                            usage_metadata={"input_tokens": usage.get("prompt_tokens", 0),
                                            "output_tokens": usage.get("completion_tokens", 0),
                                            "total_tokens": usage.get("total_tokens", 0)})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager=None,
                  **kwargs: Any) -> ChatResult:
        [body] = chat(self.client, [to_openai_messages(messages)], self._params(stop))
        return self._result(body)

    def batch(self, inputs: list, config=None, *, return_exceptions: bool = False, **kwargs: Any) -> list:
        """Every input in one generation job; AIMessages in input order."""
        if not inputs:
            return []
        conversations = [to_openai_messages(self._convert_input(i).to_messages()) for i in inputs]
        try:
            bodies = chat(self.client, conversations, self._params(kwargs.get("stop")))
        except Exception as exc:
            if return_exceptions:
                return [exc] * len(inputs)
            raise
        return [self._result(b).generations[0].message for b in bodies]
