"""Queue naming and enqueueing: the one home both the control plane and the worker import.

Light on purpose (Celery only, no torch, no worker code): `submit` and the HTTP API publish chunk
messages through it, and the worker takes its queue by the same name.
"""

from __future__ import annotations

import functools
import hashlib
import re

TASK_RUN_CHUNK = "llmbatch.run_chunk"

# What every llmbatch message is: JSON only (a pickled message is refused, never executed).
SERIALIZER = {"task_serializer": "json", "accept_content": ["json"]}


def queue_name(model: str) -> str:
    """One queue per model, so a worker only takes work for the model it holds.

    A readable slug of the name, plus a hash of the exact name: `a/b` and `a_b` share a slug
    but never a queue.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)[:120]
    return f"llmbatch.{slug}.{hashlib.sha256(model.encode()).hexdigest()[:10]}"


@functools.lru_cache(maxsize=1)
def _publisher():
    """A Celery app used only to publish: it is never made current and holds no connection pool."""
    from celery import Celery

    app = Celery("llmbatch", set_as_current=False)
    app.conf.update(**SERIALIZER, task_ignore_result=True, result_backend=None)
    return app


def enqueue_chunks(model: str, chunks: list[tuple[str, int]], broker_url: str, app=None) -> None:
    """Publish one message per chunk, (job_id, chunk_id), over one fresh broker connection."""
    if not chunks:
        return
    app = app or _publisher()
    queue = queue_name(model)
    # A connection of our own, not the app's pool: the pool would keep the broker it first saw.
    with app.connection_for_write(broker_url) as conn:
        producer = app.amqp.Producer(conn)
        for job_id, chunk_id in chunks:
            app.send_task(TASK_RUN_CHUNK, args=[job_id, chunk_id], queue=queue, routing_key=queue,
                          producer=producer, retry=True,
                          retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
