"""The LangChain and LlamaIndex adapters (jobs/integrations/), driven through the libraries' own interfaces."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from llmbatch.jobs.db import Database
from llmbatch.jobs.integrations.client import BatchFailed, LocalBatches
from llmbatch.jobs.models import Job
from tests.support import Server, start_worker, stop_worker

MODEL = "all-minilm-l6-v2"
DOCS = ["The Nile is the longest river in Africa.", "Photosynthesis turns sunlight into sugar.",
        "Mount Everest is the highest mountain on Earth.", "The violin has four strings.",
        "Bees make honey from the nectar of flowers."]


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    from llmbatch.worker.embedder import resolve_model

    return SentenceTransformer(resolve_model(MODEL), device="cpu").encode(DOCS, convert_to_numpy=True)


@pytest.fixture
def local(tmp_path):
    url = f"sqlite:///{tmp_path / 'local.db'}"
    return url, LocalBatches(model=MODEL, database_url=url, progress=False)


def jobs_in(url: str) -> int:
    with Database(url).read() as s:
        return s.scalar(select(func.count()).select_from(Job))


def test_langchain_embeddings_one_job_in_input_order(local, reference):
    from langchain_core.documents import Document
    from langchain_core.vectorstores import InMemoryVectorStore

    from llmbatch.jobs.integrations.langchain import LLMBatchEmbeddings

    url, client = local
    emb = LLMBatchEmbeddings(client=client)
    vectors = np.array(emb.embed_documents(DOCS))
    assert jobs_in(url) == 1  # five texts, one job
    assert ((vectors * reference).sum(1) >= 0.9999).all()  # unit vectors, in input order

    # LangChain's own vector store over our embeddings finds the right passage.
    store = InMemoryVectorStore(emb)
    store.add_documents([Document(page_content=d) for d in DOCS])
    [hit] = store.similarity_search("Which mountain is the tallest?", k=1)
    assert hit.page_content == DOCS[2]


def test_llamaindex_batch_is_one_job_whatever_embed_batch_size(local, reference):
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from llmbatch.jobs.integrations.llamaindex import LLMBatchEmbedding

    url, client = local
    emb = LLMBatchEmbedding(client=client, embed_batch_size=2)
    assert isinstance(emb, BaseEmbedding)
    vectors = np.array(emb.get_text_embedding_batch(DOCS))
    assert jobs_in(url) == 1
    assert ((vectors * reference).sum(1) >= 0.9999).all()
    query = emb.get_query_embedding("insects and honey")
    assert int(np.argmax(vectors @ np.array(query))) == 4
    assert emb.similarity(vectors[0].tolist(), vectors[0].tolist()) == pytest.approx(1.0, abs=1e-5)


def test_langchain_chat_batch_is_one_generation_job(tmp_path):
    from langchain_core.messages import HumanMessage, SystemMessage

    from llmbatch.jobs.integrations.langchain import ChatLLMBatch

    url = f"sqlite:///{tmp_path / 'chat.db'}"
    # The echo engine answers with the last message's words: the plumbing, not a model, is under test.
    chat = ChatLLMBatch(client=LocalBatches(database_url=url, engine="echo", progress=False), max_tokens=3)
    inputs = ["first question here", [SystemMessage("be brief"), HumanMessage("second one")], "third"]
    out = chat.batch(inputs)
    assert jobs_in(url) == 1
    assert [m.content for m in out] == ["first question here", "second one", "third"]
    assert out[0].usage_metadata["output_tokens"] == 3 and out[0].response_metadata["finish_reason"] == "length"
    assert chat.invoke("one more").content == "one more"
    assert jobs_in(url) == 2
    with pytest.raises(ValueError, match="tool"):
        from langchain_core.messages import ToolMessage

        chat.batch([[ToolMessage("x", tool_call_id="1")]])


def test_a_failed_line_raises_naming_it(local):
    from llmbatch.jobs.integrations.langchain import LLMBatchEmbeddings

    _, client = local
    with pytest.raises(BatchFailed, match="t1: context_length_exceeded: line 2: input 0 has"):
        LLMBatchEmbeddings(client=client).embed_documents(["fine", "word " * 400])


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_embeddings_through_the_http_api(db_url, broker_url, tmp_path, reference):
    from llmbatch.jobs.integrations.langchain import LLMBatchEmbeddings
    from llmbatch.jobs.integrations.llamaindex import LLMBatchEmbedding

    files = tmp_path / "files"
    files.mkdir()
    server = Server(db_url, broker_url, tmp_path / "serve.log", env={"LLMBATCH_FILES_DIR": str(files)})
    worker = start_worker(db_url, broker_url, tmp_path / "worker.log", "--model", MODEL)
    try:
        base = server.client().base_url
        lc = np.array(LLMBatchEmbeddings(base_url=str(base), model=MODEL, progress=False).embed_documents(DOCS))
        li = np.array(LLMBatchEmbedding(base_url=str(base), model_name=MODEL, progress=False)
                      .get_text_embedding_batch(DOCS))
        assert ((lc * reference).sum(1) >= 0.9999).all() and ((li * reference).sum(1) >= 0.9999).all()
        assert jobs_in(db_url) == 2
    finally:
        stop_worker(worker)
        server.stop()
