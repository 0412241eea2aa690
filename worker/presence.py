"""A worker process's row in the workers table (jobs/workers.py): registered once its model is
loaded, stamped every HEARTBEAT_SECONDS by a thread of its own, deleted when it stops."""

from __future__ import annotations

import logging
import os
import socket
import threading

from llmbatch.jobs import workers
from llmbatch.jobs.db import Database

log = logging.getLogger(__name__)


def describe_device(engine) -> str | None:
    """`cuda:0 NVIDIA H200`, `cpu`, or None (the echo engine holds no device)."""
    device = getattr(engine, "device", None)
    if device is None:
        return None
    if device.type == "cuda":
        import torch

        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device)


def adapters_of(engine) -> list[str]:
    """The LoRA adapter sources the engine holds now (its registry's, least recently used first)."""
    registry = getattr(engine, "lora", None)
    return list(getattr(registry, "lru", None) or [])


class Presence(threading.Thread):
    def __init__(self, db: Database, worker_id: str, model: str, engine_kind: str, engine):
        super().__init__(daemon=True, name=f"presence-{worker_id}")
        self.db, self.engine = db, engine
        self.me = workers.Presence(id=worker_id, host=socket.gethostname(), pid=os.getpid(),
                                   gpu=describe_device(engine), model=model, engine=engine_kind)
        self.stopped = threading.Event()

    def register(self) -> None:
        self.db.retrying(lambda s: workers.register(s, self.me, adapters_of(self.engine)))

    def run(self) -> None:
        while not self.stopped.wait(workers.HEARTBEAT_SECONDS):
            try:
                if not self.db.retrying(lambda s: workers.heartbeat(s, self.me.id, adapters_of(self.engine))):
                    self.register()  # purged while the database was out of reach: come back
            except Exception:  # the database is down: the row ages out, and comes back with it
                log.warning("could not stamp this worker's heartbeat", exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        try:
            self.db.retrying(lambda s: workers.unregister(s, self.me.id), attempts=2)
        except Exception:
            log.warning("could not remove this worker's row; it ages out in %d s", workers.LIVE_SECONDS)
