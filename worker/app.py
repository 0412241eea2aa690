"""The Celery app. Messages carry ids only; the database holds every prompt and result.

Queue names and publishing live in llmbatch.jobs.queues, which the control plane imports
instead of this module; this one stays light too (no torch, no transformers).
"""

from __future__ import annotations

from celery import Celery

from llmbatch.jobs import queues
from llmbatch.jobs.queues import SERIALIZER, TASK_RUN_CHUNK, queue_name  # noqa: F401  (re-exported)
from llmbatch.jobs.settings import Settings


def make_app(broker_url: str) -> Celery:
    app = Celery("llmbatch", broker=broker_url, include=["llmbatch.worker.tasks"])
    app.conf.update(
        **SERIALIZER,  # JSON only: a pickled message is refused, never executed
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
    """queues.enqueue_chunks through this app, on its broker unless another is named."""
    queues.enqueue_chunks(model, chunks, broker_url or app.conf.broker_url, app=app)
