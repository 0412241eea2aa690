"""Workers you can see: each worker process registers once its model is loaded and heartbeats.

Times are the database's (`work.db_time`), as leases are, so a host with a skewed clock neither
looks dead nor outlives itself. A worker is live while it was seen within LIVE_SECONDS; one that
stopped cleanly deletes its row, one that died leaves it to age out (and to be purged after
FORGET_SECONDS).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from .models import Worker, utcnow
from .work import db_time

HEARTBEAT_SECONDS = 10
LIVE_SECONDS = 3 * HEARTBEAT_SECONDS  # two heartbeats may be missed (a busy database) before it looks gone
FORGET_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Presence:
    """What a worker says about itself."""

    id: str
    host: str
    pid: int
    gpu: str | None
    model: str
    engine: str


def register(session: Session, me: Presence, adapters: list[str] | None = None) -> None:
    """Add (or refresh) this worker's row, and forget workers not seen for FORGET_SECONDS."""
    session.execute(delete(Worker).where(Worker.last_seen < db_time(session, -FORGET_SECONDS)))
    session.execute(delete(Worker).where(Worker.id == me.id))
    session.add(Worker(id=me.id, host=me.host, pid=me.pid, gpu=me.gpu, model=me.model, engine=me.engine,
                       adapters=adapters or None, started_at=utcnow(), last_seen=utcnow()))
    session.flush()
    now = db_time(session)  # the database's clock, as leases
    session.execute(update(Worker).where(Worker.id == me.id).values(started_at=now, last_seen=now))


def heartbeat(session: Session, worker_id: str, adapters: list[str] | None = None) -> bool:
    """Stamp last_seen (database time) and the adapters held; False if the row is gone (re-register)."""
    return bool(session.execute(update(Worker).where(Worker.id == worker_id)
                                .values(last_seen=db_time(session), adapters=adapters or None)).rowcount)


def unregister(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def list_workers(session: Session, include_gone: bool = False) -> list[tuple[Worker, bool]]:
    """(worker, live) pairs, newest first; only live ones unless include_gone."""
    live = Worker.last_seen >= db_time(session, -LIVE_SECONDS)
    query = select(Worker, live).order_by(Worker.model, Worker.started_at.desc())
    if not include_gone:
        query = query.where(live)
    return [(w, bool(is_live)) for w, is_live in session.execute(query).all()]


def served(session: Session) -> dict[str, list[str]]:
    """The models live workers hold -> the adapters loaded on them (sorted, deduplicated)."""
    out: dict[str, set[str]] = {}
    for w, _ in list_workers(session):
        out.setdefault(w.model, set()).update(w.adapters or [])
    return {m: sorted(a) for m, a in sorted(out.items())}


def unserved_warning(session: Session, model: str) -> str | None:
    """The warning for a job whose model no live worker serves (it is stored and waits); None if one does."""
    models = served(session)
    if model in models:
        return None
    now = ", ".join(models) if models else "none"
    return (f"no live worker serves model {model!r}; the job is stored and waits for one "
            f"(`llmbatch worker --model {model}`). Models served now: {now}")


def summary(w: Worker, live: bool) -> dict:
    iso = lambda t: t.isoformat() if t else None  # noqa: E731
    return {"id": w.id, "host": w.host, "pid": w.pid, "gpu": w.gpu, "model": w.model, "engine": w.engine,
            "adapters": w.adapters or [], "started_at": iso(w.started_at), "last_seen": iso(w.last_seen),
            "live": live}
