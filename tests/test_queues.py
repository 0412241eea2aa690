"""Queue naming and enqueueing have one home (jobs/queues.py) that the control plane and the worker share."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import redis

from llmbatch.jobs import queues

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _imports(tree):
    """(module names, line) of each import, skipping the body of cli.py's `worker` command (which starts one)."""
    skip = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "worker"
            for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            yield [node.module] + [f"{node.module}.{a.name}" for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            yield [a.name for a in node.names], node.lineno


def test_the_control_plane_never_imports_the_worker_app_to_queue_work():
    offenders = [f"{path.name}:{line}" for path in JOBS.rglob("*.py")
                 for names, line in _imports(ast.parse(path.read_text())) if "llmbatch.worker.app" in names]
    assert not offenders, offenders


def test_the_worker_takes_the_queue_the_control_plane_publishes_to(quiet_broker_url):
    from llmbatch.worker import app

    assert app.queue_name is queues.queue_name and app.TASK_RUN_CHUNK == queues.TASK_RUN_CHUNK
    client = redis.Redis.from_url(quiet_broker_url)
    client.delete(queues.queue_name("org/m"))
    queues.enqueue_chunks("org/m", [("job_x", 3), ("job_x", 4)], quiet_broker_url)
    raw = client.lrange(queues.queue_name("org/m"), 0, -1)
    assert len(raw) == 2
    message = json.loads(raw[0])
    assert message["content-type"] == "application/json" and message["headers"]["task"] == queues.TASK_RUN_CHUNK


def test_publishing_imports_no_worker_module():
    code = ("import sys; from llmbatch.jobs import batches, queues, cli; "
            "print([m for m in sys.modules if m.startswith('llmbatch.worker')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
