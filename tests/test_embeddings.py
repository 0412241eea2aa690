"""Embedding jobs end to end (jobs/embeddings.py): lines, submit, storage and every export format,
through the CLI with the bundled all-MiniLM-L6-v2 on the CPU, and the Batches API with the openai SDK."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from openai.types import CreateEmbeddingResponse
from sqlalchemy import select

from llmbatch.jobs.cli import cli
from llmbatch.jobs.db import Database
from llmbatch.jobs.embeddings import model_info, pack, unpack
from llmbatch.jobs.inputs import parse_line
from llmbatch.jobs.models import Item, Job
from llmbatch.jobs.settings import Limits
from tests.support import Server, start_worker, stop_worker, write_jsonl

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
MODEL = "all-minilm-l6-v2"


@pytest.fixture
def broker_url(quiet_broker_url):
    return quiet_broker_url


@pytest.fixture
def invoke(db_url, broker_url):
    runner = CliRunner()

    def run(*args, env=None):
        return runner.invoke(cli, ["--database-url", db_url, "--broker-url", broker_url, *map(str, args)],
                             env={"LLMBATCH_CHUNK_SIZE": "2", **(env or {})}, catch_exceptions=False)

    return run


def request_of(obj) -> dict:
    parsed = parse_line(json.dumps(obj).encode(), 1, Limits())
    assert parsed.error is None, parsed.error
    return parsed.request


def error_of(obj) -> str:
    parsed = parse_line(json.dumps(obj).encode(), 1, Limits())
    assert parsed.request is None
    return parsed.error


# ---- lines -------------------------------------------------------------------------------


def test_embedding_lines_normalize_to_one_shape():
    assert request_of({"input": "hi"}) == {"input": ["hi"]}
    assert request_of({"input": ["a", "b"], "dimensions": 8, "encoding_format": "float"}) == {
        "input": ["a", "b"], "dimensions": 8}
    assert request_of({"input": [1, 2, 3]}) == {"input": [[1, 2, 3]]}  # one input as token ids
    assert request_of({"input": [[1], [2, 3]]}) == {"input": [[1], [2, 3]]}
    assert request_of({"url": "/v1/embeddings", "body": {"model": "m", "input": "x", "encoding_format": "base64",
                                                          "user": "u"}}) == {
        "input": ["x"], "encoding_format": "base64", "url": "/v1/embeddings", "body_model": "m"}


@pytest.mark.parametrize(("obj", "message"), [
    ({"input": ""}, "empty input"),
    ({"input": ["a", " "]}, "'input[1]' is empty"),
    ({"input": []}, "'input' must not be empty"),
    ({"input": ["a"] * 2049}, "too many inputs in one line: 2049 (at most 2048)"),
    ({"input": ["a", 1]}, "'input' must hold only strings, or only token ids, or only arrays of token ids"),
    ({"input": [[1], []]}, "'input[1]' must not be empty"),
    ({"input": [-1]}, "'input' must hold token ids (integers from 0), got -1"),
    ({"input": {"text": "x"}}, "'input' must be a string, an array of strings or an array of token ids, got object"),
    ({"input": "x", "dimensions": 0}, "'dimensions' must be at least 1, got 0"),
    ({"input": "x", "dimensions": 1.5}, "'dimensions' must be an integer, got 1.5"),
    ({"input": "x", "encoding_format": "int8"}, "'encoding_format' must be 'float' or 'base64', got 'int8'"),
    ({"input": "x", "temperature": 0}, "'temperature' is a generation parameter; an embedding line takes 'input', "
                                       "'dimensions' and 'encoding_format'"),
    ({"input": "x", "prompt": "y"}, "give only one of 'prompt', 'messages', 'input' or 'body', got 'prompt', 'input'"),
    ({"prompt": "x", "dimensions": 4}, "'dimensions' is only valid on an embedding line (with 'input')"),
    ({"input": "x", "adapter": "a"}, "'adapter' is for generation lines, not embedding lines"),
    ({"url": "/v1/embeddings", "body": {"input": "x", "max_tokens": 3}},
     "unsupported parameter 'max_tokens' in body for /v1/embeddings"),
    ({"url": "/v1/embeddings", "body": {"model": "m"}}, "body for /v1/embeddings needs 'input'"),
    ({"url": "/v1/embeddings", "dimensions": 8, "body": {"input": "x"}},
     "'dimensions' belongs in 'body' on an OpenAI line"),
])
def test_bad_embedding_lines(obj, message):
    assert error_of(obj) == f"line 1: {message}"


def test_model_info_reads_the_folder_without_torch():
    info = model_info(MODEL)
    assert (info.dim, info.max_tokens) == (384, 256)
    assert model_info("org/some-hub-model") is None


def test_vectors_pack_as_float32_bytes():
    v = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    blob = pack(v)
    assert len(blob) == 3 * 4 * 4
    np.testing.assert_array_equal(unpack(blob, 4), v.astype(np.float32))


# ---- submit ------------------------------------------------------------------------------

MIXED = [
    {"custom_id": "t1", "input": "The cat sat on the mat."},
    {"custom_id": "g1", "prompt": "Write a poem."},
    {"custom_id": "t2", "url": "/v1/embeddings", "body": {"input": ["Rome", "Paris"]}},
    {"custom_id": "big", "input": "x", "dimensions": 385},
    {"custom_id": "ids", "input": list(range(1000, 1300))},
]


@SQLITE_ONLY
def test_the_model_makes_an_embedding_job_and_other_lines_are_bad(invoke, tmp_path, db_url):
    path = write_jsonl(tmp_path / "in.jsonl", MIXED)
    job_id = invoke("submit", path, "--model", MODEL).stdout.strip()
    with Database(db_url).read() as s:
        job = s.get(Job, job_id)
        assert (job.task, job.model, job.total, job.failed) == ("embed", MODEL, 5, 3)
        errors = dict(s.execute(select(Item.custom_id, Item.error_message).where(Item.job_id == job_id)).all())
    assert errors["g1"] == ("line 2: a text generation line in an embedding job: a job is either generation or "
                            "embedding; an embedding line has 'input' (or url /v1/embeddings)")
    assert errors["big"] == f"line 4: 'dimensions' is 385, but model '{MODEL}' gives 384-dimension vectors"
    assert errors["ids"] == f"line 5: input 0 has 300 tokens, over model '{MODEL}''s context of 256 tokens"
    assert errors["t1"] is None and errors["t2"] is None


@SQLITE_ONLY
def test_the_first_valid_line_or_the_flag_decides(invoke, tmp_path, db_url):
    path = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "bad", "input": ""}, *MIXED[:3]])
    job_id = invoke("submit", path).stdout.strip()  # no model: the first valid line is an embedding line
    text_id = invoke("submit", path, "--task", "generate").stdout.strip()
    with Database(db_url).read() as s:
        job, text_job = s.get(Job, job_id), s.get(Job, text_id)
        # The default model generates text: an embedding job given no model gets the bundled embedder.
        assert (job.task, job.model, job.failed) == ("embed", MODEL, 2)
        assert (text_job.task, text_job.failed) == ("generate", 3)
        msg = s.scalar(select(Item.error_message).where(Item.job_id == text_id, Item.custom_id == "t1"))
    assert msg.startswith("line 2: an embedding line ('input') in a text generation job")


# ---- run and export ----------------------------------------------------------------------

TEXTS = ["The cat sat on the mat.", "Rome was not built in a day.", "Paris is the capital of France.",
         "Photosynthesis turns light into sugar."]


@pytest.fixture
def finished(invoke, tmp_path, db_url):
    """An embedding job run in-process with the real model: four good lines, one too long."""
    lines = [{"custom_id": "one", "input": TEXTS[0]},
             {"custom_id": "two", "url": "/v1/embeddings", "method": "POST",
              "body": {"model": "my-embedder", "input": TEXTS[1:3], "encoding_format": "base64"}},
             {"custom_id": "long", "input": "word " * 300},
             {"custom_id": "three", "input": TEXTS[3]}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    result = invoke("run", path, "--model", MODEL, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    with Database(db_url).read() as s:
        job = s.scalars(select(Job)).one()
        return job.id, tmp_path


def st_vectors(texts):
    from sentence_transformers import SentenceTransformer

    from llmbatch.worker.embedder import resolve_model

    return SentenceTransformer(resolve_model(MODEL), device="cpu").encode(texts, convert_to_numpy=True)


def test_exports_of_an_embedding_job(finished, invoke, db_url):
    job_id, tmp = finished
    reference = st_vectors(TEXTS)
    with Database(db_url).read() as s:
        blobs = dict(s.execute(select(Item.custom_id, Item.embedding).where(Item.job_id == job_id)).all())
    assert isinstance(blobs["two"], bytes) and len(blobs["two"]) == 2 * 384 * 4 and blobs["long"] is None

    native = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    assert [d["custom_id"] for d in native] == ["one", "two", "long", "three"]
    assert native[2]["status"] == "failed" and native[2]["error"]["code"] == "context_length_exceeded"
    assert native[2]["error"]["message"].startswith("line 3: input 0 has 302 tokens")
    got = np.array([native[0]["embeddings"][0], *native[1]["embeddings"], native[3]["embeddings"][0]])
    assert ((got * reference).sum(1) >= 0.9999).all()
    assert native[1]["dimensions"] == 384 and native[1]["prompt_tokens"] > 0

    # OpenAI: CreateEmbeddingResponse bodies; base64 is float32 little-endian, as OpenAI sends it.
    out = invoke("export", job_id, "--format", "openai").stdout.splitlines()
    bodies = {json.loads(line)["custom_id"]: json.loads(line) for line in out}
    assert bodies["long"]["response"] is None and bodies["long"]["error"]["code"] == "context_length_exceeded"
    one = CreateEmbeddingResponse.model_validate(bodies["one"]["response"]["body"])
    assert one.model == MODEL and one.usage.prompt_tokens == one.usage.total_tokens > 0
    np.testing.assert_allclose(one.data[0].embedding, got[0], rtol=1e-6)
    # The SDK's type holds floats (it decodes base64 itself when it asked for it): check the raw body.
    two = bodies["two"]["response"]["body"]
    assert two["object"] == "list" and two["model"] == "my-embedder"
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in two["data"]]
    assert [d["index"] for d in two["data"]] == [0, 1]
    np.testing.assert_array_equal(np.stack(decoded), got[1:3].astype(np.float32))

    # Parquet: one row per vector, a fixed-size list column, no JSON to parse.
    assert invoke("export", job_id, "--format", "parquet", "-o", tmp / "v.parquet").exit_code == 0
    table = pq.read_table(tmp / "v.parquet")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[384]"
    assert table.column("custom_id").to_pylist() == ["one", "two", "two", "long", "three"]
    assert table.column("index").to_pylist() == [0, 0, 1, None, 0]
    matrix = table.filter(table.column("embedding").is_valid()).column("embedding").combine_chunks()
    np.testing.assert_array_equal(matrix.flatten().to_numpy().reshape(-1, 384), got.astype(np.float32))
    assert table.column("error").to_pylist()[3].startswith("context_length_exceeded: line 3")

    # CSV: the vectors as JSON text in one cell.
    rows = list(csv.DictReader(io.StringIO(invoke("export", job_id, "--format", "csv").stdout)))
    assert json.loads(rows[0]["embeddings"]) == native[0]["embeddings"] and rows[2]["embeddings"] == ""


@SQLITE_ONLY
def test_parquet_refusals(invoke, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    job_id = invoke("submit", path).stdout.strip()
    no_file = invoke("export", job_id, "--format", "parquet")
    assert no_file.exit_code == 2 and "--format parquet writes a binary file: give -o FILE" in no_file.output
    text = invoke("export", job_id, "--format", "parquet", "-o", tmp_path / "x.parquet")
    assert text.exit_code == 1
    assert f"--format parquet is for embedding jobs; job {job_id} generates text" in text.output
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.parquet.part").exists()
    mixed = write_jsonl(tmp_path / "dims.jsonl", [{"input": "a"}, {"input": "b", "dimensions": 32}])
    invoke("run", mixed, "--engine", "echo", "-o", tmp_path / "dims.out")
    job = json.loads(invoke("status", "--json").stdout)[0]["id"]
    sizes = invoke("export", job, "--format", "parquet", "-o", tmp_path / "d.parquet")
    assert sizes.exit_code == 1 and "has vectors of 2 sizes (32, 384)" in sizes.output


# ---- the Batches API through the openai SDK ----------------------------------------------


@pytest.mark.slow
@SQLITE_ONLY
def test_batches_api_embeddings_with_a_real_worker(db_url, broker_url, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": MODEL, "input": t, **({"dimensions": 128} if i == 1 else {})}}
             for i, t in enumerate(TEXTS)]
    lines.append({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": "hi"}]}})
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    server = Server(db_url, broker_url, tmp_path / "serve.log", env={"LLMBATCH_FILES_DIR": str(files)})
    worker = start_worker(db_url, broker_url, tmp_path / "worker.log", "--model", MODEL)
    try:
        client = server.client()
        with open(path, "rb") as f:
            up = client.files.create(file=f, purpose="batch")
        batch = client.batches.create(input_file_id=up.id, endpoint="/v1/embeddings", completion_window="24h")
        import time

        deadline = time.monotonic() + 180
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.3)
        assert batch.status == "completed" and batch.model == MODEL
        assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 1)
        out = client.files.content(batch.output_file_id).text.splitlines()
        parsed = {json.loads(x)["custom_id"]: CreateEmbeddingResponse.model_validate(json.loads(x)["response"]["body"])
                  for x in out}
        reference = st_vectors(TEXTS)
        for i in range(4):
            v = np.array(parsed[f"c{i}"].data[0].embedding)
            want = reference[i][:128] / np.linalg.norm(reference[i][:128]) if i == 1 else reference[i]
            assert v.shape == want.shape and float(v @ want) >= 0.9999
        errors = client.files.content(batch.error_file_id).text
        # A chat line in an embeddings batch: its url is not the batch's endpoint (checked first, issue 20).
        assert "url '/v1/chat/completions' does not match the batch's endpoint '/v1/embeddings'" in errors
    finally:
        stop_worker(worker)
        server.stop()
