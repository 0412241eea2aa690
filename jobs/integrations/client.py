"""One batch job for a list of request lines, and its results in input order.

Two ways to run it, one result shape (OpenAI batch output lines, the `--format openai` export):

- `HTTPBatches`: the OpenAI Files and Batches API of `llmbatch serve`, through the `openai` SDK.
  The adapters' default for a deployment: an application holds a URL and a key, not a database
  URL, and never loads a model; the API is the authenticated boundary, and workers on GPUs do the
  work.
- `LocalBatches`: submit into a local database and drain the job with an engine in this process,
  as `llmbatch run` does. For notebooks, examples and tests: no server, no broker, no worker.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field

from llmbatch.jobs.exceptions import LLMBatchError
from llmbatch.jobs.progress import Progress

FINAL = ("completed", "failed", "cancelled", "expired")


class BatchFailed(LLMBatchError):
    """The job, or one of its lines, did not succeed; the message names which and why."""


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def in_order(lines: list[dict], outputs: list[dict]) -> list[dict]:
    """Output lines in the order of the request lines (matched by custom_id); a failed line raises."""
    by_id = {o["custom_id"]: o for o in outputs}
    ordered = []
    for line in lines:
        out = by_id.get(line["custom_id"])
        if out is None:
            raise BatchFailed(f"no result for {line['custom_id']!r}")
        if out.get("error"):
            raise BatchFailed(f"{line['custom_id']}: {out['error'].get('code')}: {out['error'].get('message')}")
        ordered.append(out["response"]["body"])
    return ordered


@dataclass
class HTTPBatches:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    api_key: str = "none"  # a key of LLMBATCH_API_KEYS, when the server has them
    model: str | None = None  # the batch's model (the server's default when None)
    poll_interval: float = 0.5
    timeout: float | None = None  # seconds to wait for the batch; None waits as long as it takes
    progress: bool = True  # a progress line on stderr while the batch runs

    def run(self, lines: list[dict], endpoint: str) -> list[dict]:
        from openai import OpenAI

        client = OpenAI(base_url=self.base_url, api_key=self.api_key)
        f = client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h",
                                      extra_body={"model": self.model} if self.model else None)
        bar = Progress(len(lines)) if self.progress else None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while batch.status not in FINAL:
                if deadline is not None and time.monotonic() > deadline:
                    raise BatchFailed(f"batch {batch.id} is still {batch.status} after {self.timeout:g}s")
                time.sleep(self.poll_interval)
                batch = client.batches.retrieve(batch.id)
                counts = batch.request_counts
                if bar and counts:
                    bar.update(counts.completed + counts.failed - bar.done)
        finally:
            if bar:
                bar.close()
        if batch.status != "completed":
            raise BatchFailed(f"batch {batch.id} ended {batch.status}"
                              + (f": {batch.errors.data[0].message}" if batch.errors and batch.errors.data else ""))
        outputs = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                outputs += [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]
        return in_order(lines, outputs)


@dataclass
class LocalBatches:
    model: str | None = None  # LLMBATCH_MODEL's default when None
    database_url: str | None = None  # LLMBATCH_DATABASE_URL's default when None
    engine: str = "model"  # `echo` for tests of the plumbing only
    progress: bool = True
    _engines: dict = field(default_factory=dict, repr=False)

    def run(self, lines: list[dict], endpoint: str) -> list[dict]:
        from llmbatch.jobs import service
        from llmbatch.jobs.db import Database
        from llmbatch.jobs.export import export
        from llmbatch.jobs.settings import Settings
        from llmbatch.worker.runner import run_chunk

        settings = Settings.from_env(database_url=self.database_url, engine=self.engine)
        db = Database(settings.database_url)
        db.ensure_schema()
        task = "embed" if endpoint == "/v1/embeddings" else "generate"
        with db.write() as s:
            submitted = service.submit(s, io.BytesIO(jsonl(lines)), settings, model=self.model, task=task,
                                       source=f"<{type(self).__name__}>")
            job_id, model = submitted.job.id, submitted.job.model
        engine = self._engine(model, settings)
        bar = Progress(len(lines)) if self.progress else None
        if bar:
            bar.update(submitted.bad_lines)
        try:
            for chunk_id in submitted.chunk_ids:
                run_chunk(db, engine, chunk_id, f"local:{id(self)}", settings.lease_seconds,
                          on_results=(lambda rs: bar.update(len(rs))) if bar else None)
        finally:
            if bar:
                bar.close()
        out = io.StringIO()
        with db.read() as s:
            export(s, service.get_job(s, job_id), out, "openai")
        db.dispose()
        return in_order(lines, [json.loads(x) for x in out.getvalue().splitlines() if x])

    def _engine(self, model: str, settings):
        """Loaded once per model and kept: a second bulk call reuses it."""
        if model not in self._engines:
            from llmbatch.worker.engines import make_engine

            self._engines[model] = make_engine(model, settings)
        return self._engines[model]


def make_client(base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                database_url: str | None = None, progress: bool = True):
    """HTTPBatches when given a base_url, else LocalBatches."""
    if base_url:
        return HTTPBatches(base_url=base_url, api_key=api_key or "none", model=model, progress=progress)
    return LocalBatches(model=model, database_url=database_url, progress=progress)


def embedding_lines(texts: list[str], dimensions: int | None = None) -> list[dict]:
    body = {"dimensions": dimensions} if dimensions else {}
    return [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": t, **body}}
            for i, t in enumerate(texts)]


def embed(client, texts: list[str], dimensions: int | None = None) -> list[list[float]]:
    """One embedding job for `texts`; a vector per text, in their order."""
    if not texts:
        return []
    bodies = client.run(embedding_lines(list(texts), dimensions), "/v1/embeddings")
    return [b["data"][0]["embedding"] for b in bodies]


def chat(client, conversations: list[list[dict]], params: dict | None = None) -> list[dict]:
    """One generation job for `conversations` (OpenAI messages); a chat.completion body each, in order."""
    if not conversations:
        return []
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": m, **(params or {})}} for i, m in enumerate(conversations)]
    return client.run(lines, "/v1/chat/completions")
