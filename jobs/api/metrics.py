"""/metrics for Prometheus, read from the database and the broker at each scrape.

The job counters already hold the item counts, so a scrape reads the jobs table (one row per
job), never the items; queue depth is the length of each model's Redis list (Celery's queue).

Who sees what: with API keys on, an ordinary key sees the totals of its own jobs only, and no
queue depths (a queue holds every owner's work); an operator key (LLMBATCH_ADMIN_KEYS) sees
everything. Without keys (a loopback server) everything is visible, as on the dashboard.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from llmbatch.jobs.models import Job
from llmbatch.jobs.queues import queue_name

from .app import owner

router = APIRouter()


class _Collector:
    def __init__(self, db, broker_url: str, owner: str | None, everything: bool):
        self.db, self.broker_url = db, broker_url
        self.owner, self.everything = owner, everything  # everything: no owner filter, and queue depths

    def collect(self):
        items = GaugeMetricFamily("llmbatch_items", "Items by state and model.", labels=["model", "state"])
        tokens = CounterMetricFamily("llmbatch_tokens", "Tokens processed, by kind and model.",
                                     labels=["model", "kind"])
        jobs = GaugeMetricFamily("llmbatch_jobs", "Jobs by status and model.", labels=["model", "status"])
        cols = [func.coalesce(func.sum(getattr(Job, c)), 0) for c in Job.COUNTERS]
        mine = [] if self.everything else [Job.owner == self.owner]
        with self.db.read() as s:
            by_model = s.execute(select(Job.model, *cols, func.coalesce(func.sum(Job.prompt_tokens), 0),
                                        func.coalesce(func.sum(Job.completion_tokens), 0))
                                 .where(*mine).group_by(Job.model)).all()
            by_status = s.execute(select(Job.model, Job.status, func.count()).where(*mine)
                                  .group_by(Job.model, Job.status)).all()
        models = []
        for model, *counts in by_model:
            models.append(model)
            for state, n in zip(Job.COUNTERS, counts):
                items.add_metric([model, state], n)
            tokens.add_metric([model, "prompt"], counts[-2])
            tokens.add_metric([model, "completion"], counts[-1])
        for model, status, n in by_status:
            jobs.add_metric([model, getattr(status, "value", status)], n)
        yield items
        yield tokens
        yield jobs
        yield from self._queues(models if self.everything else [])

    def _queues(self, models):
        import redis

        depth = GaugeMetricFamily("llmbatch_queue_depth", "Chunk messages waiting in each model's queue.",
                                  labels=["model", "queue"])
        up = GaugeMetricFamily("llmbatch_broker_up", "1 if the broker answered this scrape.")
        client = redis.Redis.from_url(self.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            pipe = client.pipeline(transaction=False)
            for model in models:
                pipe.llen(queue_name(model))
            for model, n in zip(models, pipe.execute()):
                depth.add_metric([model, queue_name(model)], n)
            up.add_metric([], 1)
        except redis.RedisError:
            up.add_metric([], 0)
        finally:
            client.close()
        yield depth
        yield up


@router.get("/metrics")
def metrics(request: Request, who: str | None = Depends(owner)):
    registry = CollectorRegistry(auto_describe=False)
    everything = request.app.state.keys.is_admin(who)
    registry.register(_Collector(request.app.state.db, request.app.state.settings.broker_url, who, everything))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
