"""Probes for load balancers and orchestrators: /healthz (the process answers) and /readyz
(it can do its work: the database and the broker answer). Neither needs a key, and neither
says more than which dependency is down."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text


router = APIRouter()
PROBE_TIMEOUT_S = 2


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


def _database_ok(db) -> str | None:
    """None if the database answers, else why not."""
    try:
        with db.read() as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:
        return f"database unreachable ({type(exc).__name__})"
    return None


def _broker_ok(broker_url: str) -> str | None:
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"broker unreachable ({type(exc).__name__})"
    finally:
        client.close()
    return None


@router.get("/readyz")
def readyz(request: Request):
    checks = {"database": _database_ok(request.app.state.db),
              "broker": _broker_ok(request.app.state.settings.broker_url)}
    problems = [p for p in checks.values() if p]
    body = {"status": "ready" if not problems else "unavailable",
            "checks": {name: "ok" if p is None else "down" for name, p in checks.items()}}
    if not problems:
        return body
    from .app import error_body

    return JSONResponse({**error_body("; ".join(problems), "server_error", code="not_ready"), **body},
                        status_code=503)
