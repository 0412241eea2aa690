"""The Celery app. Messages carry ids only; the database holds every prompt and result.

Imported by the CLI to queue work, so it must stay light: no torch, no transformers here.
"""

from __future__ import annotations

import hashlib
import re

from celery import Celery

from llmbatch.jobs.settings import Settings

TASK_RUN_CHUNK = "llmbatch.run_chunk"


def queue_name(model: str) -> str:
    """One queue per model, so a worker only takes work for the model it holds.

    A readable slug of the name, plus a hash of the exact name: `a/b` and `a_b` share a slug
    but never a queue.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)[:120]
    return f"llmbatch.{slug}.{hashlib.sha256(model.encode()).hexdigest()[:10]}"


def make_app(broker_url: str) -> Celery:
    app = Celery("llmbatch", broker=broker_url, include=["llmbatch.worker.tasks"])
    app.conf.update(
        # JSON only: a pickled message is refused, never executed.
        task_serializer="json",
        accept_content=["json"],
        # Results live in the database; Celery keeps none.
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: ack after the task ran, requeue if the worker process dies under it,
        # and take one message at a time so a busy worker hoards nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacked message only after this; the DB lease recovers sooner.
        broker_transport_options={"visibility_timeout": 3600},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits out a broker restart
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # Loading a large model in a fresh child takes longer than Celery's 4 s default.
        worker_proc_alive_timeout=600,
        task_create_missing_queues=True,
    )
    return app


app = make_app(Settings.from_env().broker_url)


def configure(broker_url: str) -> Celery:
    """Point the module-level app at another broker (the CLI's --broker-url flag)."""
    app.conf.broker_url = broker_url
    return app


def enqueue_chunks(model: str, chunks: list[tuple[str, int]], broker_url: str | None = None) -> None:
    """Publish one message per chunk, (job_id, chunk_id), over one fresh broker connection."""
    if not chunks:
        return
    queue = queue_name(model)
    # A connection of our own, not the app's pool: the pool would keep the broker it first saw.
    with app.connection_for_write(broker_url or app.conf.broker_url) as conn:
        producer = app.amqp.Producer(conn)
        for job_id, chunk_id in chunks:
            app.send_task(TASK_RUN_CHUNK, args=[job_id, chunk_id], queue=queue, routing_key=queue,
                          producer=producer, retry=True,
                          retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
