"""LlamaIndex adapter (`pip install llmbatch[llamaindex]`): `LLMBatchEmbedding`, a BaseEmbedding
whose `get_text_embedding_batch` embeds every text in ONE llmbatch job (LlamaIndex's own loop
would cut them into calls of `embed_batch_size`), vectors in input order.

Through llmbatch's HTTP Batches API when given `base_url`, else in this process against the local
database (see client.py).
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import PrivateAttr

from .client import embed, make_client


class LLMBatchEmbedding(BaseEmbedding):
    base_url: str | None = None
    api_key: str | None = None
    database_url: str | None = None
    dimensions: int | None = None
    progress: bool = True
    _client: Any = PrivateAttr(default=None)

    def __init__(self, *, client=None, **kwargs: Any):
        super().__init__(**kwargs)
        self._client = client or make_client(self.base_url, self.api_key, self.model_name if self.model_name != "unknown"
                                              else None, self.database_url, self.progress)

    @classmethod
    def class_name(cls) -> str:
        return "LLMBatchEmbedding"

    def _embed(self, texts: list[str]) -> list[list[float]]:
        return embed(self._client, texts, self.dimensions)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def get_text_embedding_batch(self, texts: list[str], show_progress: bool = False, **kwargs: Any) -> list[list[float]]:
        """One job for all of `texts` (the progress line is llmbatch's own, on stderr)."""
        return self._embed(list(texts))
