"""The dashboard: server-rendered pages (Jinja2), refreshed in place by a few lines of inline JS.

Nothing is loaded from elsewhere (no CDN, no build step), so it works offline. The script asks
for the same URL with `X-Fragment: 1` every few seconds and swaps in the returned fragment.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select

from llmbatch.jobs import service, workers
from llmbatch.jobs.models import Item, ItemStatus, Job, utcnow

from .app import page_owner

router = APIRouter()
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]))
JOBS_SHOWN = 50
FAILED_SAMPLE = 20
REFRESH_MS = 2000


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def job_view(job: Job, now: datetime) -> dict:
    """What a row shows: progress, throughput since the job started, and an ETA at that rate."""
    done = job.succeeded + job.failed + job.cancelled
    pct = 100.0 * done / job.total if job.total else (100.0 if job.finished_at else 0.0)
    elapsed = ((job.finished_at or now) - job.started_at).total_seconds() if job.started_at else None
    tok_s = job.completion_tokens / elapsed if elapsed and elapsed > 0 else None
    # Rate over the items this job's workers finished (bad lines fail at submit, not in the rate).
    worked = job.succeeded + (job.failed if job.started_at else 0)
    eta = None
    if elapsed and worked and job.finished_at is None:
        eta = (job.pending + job.running) / (worked / elapsed)
    return {"id": job.id, "name": job.name or "", "model": job.model, "status": job.status.value,
            "total": job.total, "done": done, "succeeded": job.succeeded, "failed": job.failed,
            "cancelled": job.cancelled, "pending": job.pending, "running": job.running, "pct": round(pct, 1),
            "tok_s": f"{tok_s:,.1f}" if tok_s is not None else "–", "eta": _duration(eta),
            "elapsed": _duration(elapsed), "created": job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            "prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens}


def _render(request: Request, template: str, **context) -> HTMLResponse:
    fragment = request.headers.get("x-fragment") == "1"
    html = TEMPLATES.get_template(template).render(fragment=fragment, refresh_ms=REFRESH_MS, **context)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@router.get("/", response_class=HTMLResponse)
def index(request: Request, who: str | None = Depends(page_owner)):
    now = utcnow()
    with request.app.state.db.read() as s:
        query = select(Job).order_by(Job.created_at.desc()).limit(JOBS_SHOWN)
        if who is not None:
            query = query.where(Job.owner == who)
        jobs = [job_view(j, now) for j in s.scalars(query)]
        live = [workers.summary(w, True) for w, _ in workers.list_workers(s)]
    served = {w["model"] for w in live}
    for j in jobs:  # a job no live worker can run says so, instead of waiting silently
        j["unserved"] = j["status"] in ("validating", "queued", "running") and j["model"] not in served
    return _render(request, "index.html", jobs=jobs, workers=live, now=now.strftime("%H:%M:%S"))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, who: str | None = Depends(page_owner)):
    now = utcnow()
    with request.app.state.db.read() as s:
        job = service.get_job(s, job_id, who)  # id or name, among the caller's own jobs only
        failed = s.execute(select(Item.line, Item.custom_id, Item.error_code, Item.error_message)
                           .where(Item.job_id == job.id, Item.status == ItemStatus.failed)
                           .order_by(Item.line).limit(FAILED_SAMPLE)).all()
        view = job_view(job, now)
    return _render(request, "job.html", job=view, failed=failed, sample=FAILED_SAMPLE, now=now.strftime("%H:%M:%S"))
