"""The `llmbatch` command line. submit/status/export never import torch, so they start fast."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from .exceptions import BrokerUnavailable, LLMBatchError
from .inputs import PARAM_NAMES
from .settings import Settings, redact_url

FINAL_JOB_STATES = ("completed", "cancelled", "failed")


class Context:
    def __init__(self, database_url: str | None, broker_url: str | None):
        self.settings = Settings.from_env(database_url=database_url, broker_url=broker_url)

    @functools.cached_property
    def db(self):
        from .db import Database

        db = Database(self.settings.database_url)
        db.ensure_schema()
        return db


def handle_errors(fn):
    """Turn our errors, and an unreachable database or broker, into one clear line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LLMBatchError as exc:
            raise click.ClickException(str(exc)) from exc
        except click.ClickException:
            raise
        except Exception as exc:
            from sqlalchemy.exc import OperationalError

            if isinstance(exc, OperationalError):
                settings = click.get_current_context().find_object(Context).settings
                raise click.ClickException(
                    f"database unavailable at {redact_url(settings.database_url)}: {str(exc.orig).strip()}") from exc
            raise

    return wrapper


def generation_options(fn):
    """The job-wide generation defaults; per-line parameters override them."""
    options = [
        click.option("--max-tokens", type=int, help="Most new tokens per item (default 256)."),
        click.option("--temperature", type=float, help="0 = greedy (default)."),
        click.option("--top-p", type=float),
        click.option("--top-k", type=int),
        click.option("--seed", type=int),
        click.option("--stop", multiple=True, help="Stop string; repeat for several."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def collect_params(kw: dict) -> dict:
    params = {k: kw.pop(k) for k in PARAM_NAMES}
    params["stop"] = list(params["stop"]) or None
    return {k: v for k, v in params.items() if v is not None}


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--database-url", envvar="LLMBATCH_DATABASE_URL", help="SQLAlchemy URL [env LLMBATCH_DATABASE_URL].")
@click.option("--broker-url", envvar="LLMBATCH_BROKER_URL", help="Celery broker URL [env LLMBATCH_BROKER_URL].")
@click.version_option(package_name="llmbatch")
@click.pass_context
def cli(ctx, database_url, broker_url):
    """Bulk LLM generation as batch jobs on your own GPUs."""
    ctx.obj = Context(database_url, broker_url)


def _enqueue(ctx: Context, model: str, job_id: str, chunk_ids: list[int]) -> None:
    from llmbatch.worker import app as celery_app

    from . import work

    try:
        celery_app.enqueue_chunks(model, [(job_id, c) for c in chunk_ids], ctx.settings.broker_url)
    except Exception as exc:
        raise BrokerUnavailable(
            f"job {job_id} is stored, but its work could not be queued at "
            f"{redact_url(ctx.settings.broker_url)} ({type(exc).__name__}: {exc}); "
            f"start the broker and run `llmbatch retry {job_id}`") from exc
    with ctx.db.write() as s:
        work.mark_enqueued(s, chunk_ids)


PROGRESS_MIN_BYTES = 16 * 1024**2  # files larger than this show a progress bar on stderr while they are stored


def _store(ctx: Context, file: Path, *, model, name, params, strict):
    from . import service
    from .progress import Progress

    size = file.stat().st_size
    progress = Progress(size, "bytes") if size > PROGRESS_MIN_BYTES else None
    # A large read buffer: the parser reads line by line, so fewer system calls for a big file.
    with open(file, "rb", buffering=1 << 20) as fp:
        on_line = (lambda _n: progress.update(fp.tell() - progress.done)) if progress else None
        try:
            with ctx.db.write() as s:
                submitted = service.submit(s, fp, ctx.settings, model=model, name=name, params=params,
                                           strict=strict, source=str(file), on_line=on_line)
        finally:
            if progress:
                progress.close()  # end the bar's line, so an error message starts on a line of its own
    return submitted


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", envvar="LLMBATCH_MODEL", help="Model id or path [env LLMBATCH_MODEL].")
@click.option("--name", help="A name to find the job by.")
@click.option("--strict", is_flag=True, help="Refuse the whole file if any line is bad.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the id.")
@generation_options
@pass_ctx
@handle_errors
def submit(ctx, file, model, name, strict, as_json, **kw):
    """Validate and store FILE as a job, and queue its work; prints the job id."""
    from .service import job_summary

    submitted = _store(ctx, file, model=model, name=name, params=collect_params(kw), strict=strict)
    job = submitted.job
    _enqueue(ctx, job.model, job.id, submitted.chunk_ids)
    if submitted.bad_lines:
        click.echo(f"{submitted.bad_lines} bad line(s) stored as failed items; see `llmbatch export {job.id} "
                   f"--only failed`", err=True)
    click.echo(json.dumps({**job_summary(job), "chunks": len(submitted.chunk_ids)}) if as_json else job.id)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_ctx
@handle_errors
def validate(ctx, file):
    """Report every bad line of FILE; store nothing."""
    from .service import validate as check

    with open(file, "rb") as fp:
        total, errors = check(fp, ctx.settings)
    for e in errors:
        click.echo(e)
    if errors:
        raise click.ClickException(f"{len(errors)} of {total} line(s) are bad")
    click.echo(f"{total} line(s), all valid")


def _status_line(job) -> str:
    return (f"{job['id']}  {job['status']:<10}  {job['succeeded']}/{job['total']} succeeded, {job['failed']} failed, "
            f"{job['pending']} pending, {job['running']} running, {job['cancelled']} cancelled")


@cli.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Refresh until the job finishes.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between --watch refreshes.")
@click.option("--limit", default=20, show_default=True, help="Jobs in the table.")
@pass_ctx
@handle_errors
def status(ctx, job_id, as_json, watch, interval, limit):
    """Show one job's state and counts, or a table of recent jobs."""
    from . import service

    if not job_id:
        with ctx.db.read() as s:
            jobs = [service.job_summary(j) for j in service.list_jobs(s, limit)]
        if as_json:
            click.echo(json.dumps(jobs))
            return
        click.echo(f"{'ID':<21}  {'STATUS':<10}  {'MODEL':<28}  {'DONE':>15}  {'FAILED':>7}  CREATED")
        for j in jobs:
            done = f"{j['succeeded'] + j['failed'] + j['cancelled']}/{j['total']}"
            click.echo(f"{j['id']:<21}  {j['status']:<10}  {j['model'][:28]:<28}  {done:>15}  {j['failed']:>7}  "
                       f"{j['created_at'][:19]}")
        return
    while True:
        # Reads one row: the counters are kept in step with the items, never counted.
        with ctx.db.read() as s:
            summary = service.job_summary(service.get_job(s, job_id))
        click.echo(json.dumps(summary) if as_json else _status_line(summary))
        if not watch or summary["status"] in FINAL_JOB_STATES:
            return
        time.sleep(interval)


@cli.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="File to write; default stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "openai", "csv"]), default="jsonl", show_default=True)
@click.option("--only", type=click.Choice(["succeeded", "failed", "cancelled"]))
@pass_ctx
@handle_errors
def export(ctx, job_id, output, fmt, only):
    """Stream a job's results, in line order."""
    _export(ctx, job_id, output, fmt, only)


def _export(ctx: Context, job_id: str, output: Path | None, fmt: str, only: str | None = None) -> int:
    from . import service
    from .export import export as write

    with ctx.db.read() as s:
        job = service.get_job(s, job_id)
        if output is None:
            return write(s, job, sys.stdout, fmt, only)
        tmp = output.with_name(output.name + ".part")
        with open(tmp, "w", encoding="utf-8", newline="", buffering=1 << 20) as out:
            rows = write(s, job, out, fmt, only)
        tmp.replace(output)  # never leave a half-written export under the real name
        return rows


@cli.command()
@click.argument("job_id")
@pass_ctx
@handle_errors
def cancel(ctx, job_id):
    """Cancel a job's pending work; finished results are kept."""
    from . import service

    with ctx.db.write() as s:
        job = service.cancel(s, job_id)
    click.echo(f"{job.id} {job.status.value}: {job.cancelled} item(s) cancelled")


@cli.command()
@click.argument("job_id")
@pass_ctx
@handle_errors
def retry(ctx, job_id):
    """Requeue a finished job's failed items."""
    from . import service

    with ctx.db.write() as s:
        job = service.get_job(s, job_id)
        model = job.model
        # Chunks that never reached the broker (it was down at submit) are queued whatever the state.
        unqueued = service.unqueued_chunks(s, job_id)
        finished = job.status.value in FINAL_JOB_STATES
        chunk_ids = service.retry(s, job_id) if finished or not unqueued else []
    chunk_ids = sorted(set(chunk_ids) | set(unqueued))
    if not chunk_ids:
        click.echo(f"{job_id}: nothing to retry")
        return
    _enqueue(ctx, model, job_id, chunk_ids)
    click.echo(f"{job_id}: requeued {len(chunk_ids)} chunk(s)")


@cli.command()
@click.option("--model", envvar="LLMBATCH_MODEL", help="Model to hold [env LLMBATCH_MODEL].")
@click.option("--concurrency", "-c", default=1, show_default=True, help="Worker processes, each with the model.")
@click.option("--engine", "engine_kind", type=click.Choice(["model", "echo"]), default="model", show_default=True,
              help="`echo` skips the model: for testing and benchmarking the orchestration only.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", "-n", help="Celery node name (default llmbatch@HOST).")
@pass_ctx
@handle_errors
def worker(ctx, model, concurrency, engine_kind, loglevel, hostname):
    """Start a Celery worker that holds the model and takes its queue."""
    import logging

    model = model or ctx.settings.model
    # The pool's child processes read these when they load the model.
    os.environ.update(LLMBATCH_MODEL=model, LLMBATCH_ENGINE=engine_kind,
                      LLMBATCH_DATABASE_URL=ctx.settings.database_url, LLMBATCH_BROKER_URL=ctx.settings.broker_url)
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    ctx.db  # create or upgrade the schema once, before any child races to
    from llmbatch.worker import app as celery_app
    from llmbatch.worker import tasks  # noqa: F401  (registers the task)

    app = celery_app.configure(ctx.settings.broker_url)
    queue = celery_app.queue_name(model)
    click.echo(f"llmbatch worker: model {model} on queue {queue}, broker {redact_url(ctx.settings.broker_url)}, "
               f"database {redact_url(ctx.settings.database_url)}", err=True)
    app.worker_main(["worker", "-Q", queue, "-c", str(concurrency), "--loglevel", loglevel,
                     "-n", hostname or "llmbatch@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"])


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Results file (default: FILE's name with .results.jsonl, or .results.csv).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "openai", "csv"]), default="jsonl", show_default=True)
@click.option("--model", envvar="LLMBATCH_MODEL", help="Model id or path [env LLMBATCH_MODEL].")
@click.option("--name")
@click.option("--strict", is_flag=True, help="Refuse the whole file if any line is bad.")
@click.option("--engine", "engine_kind", type=click.Choice(["model", "echo"]), default="model", hidden=True)
@generation_options
@pass_ctx
@handle_errors
def run(ctx, file, output, fmt, model, name, strict, engine_kind, **kw):
    """Submit FILE, generate every line in this process, and export: no services needed."""
    from llmbatch.worker.engines import make_engine
    from llmbatch.worker.runner import run_chunk

    from .progress import Progress

    submitted = _store(ctx, file, model=model, name=name, params=collect_params(kw), strict=strict)
    job = submitted.job
    click.echo(f"job {job.id}: {job.total} line(s), {submitted.bad_lines} bad; loading {job.model}", err=True)
    engine = make_engine(job.model, dataclasses.replace(ctx.settings, engine=engine_kind))
    progress = Progress(job.total)
    progress.update(submitted.bad_lines)
    name = f"run:{os.getpid()}"
    for chunk_id in submitted.chunk_ids:
        run_chunk(ctx.db, engine, chunk_id, name, ctx.settings.lease_seconds,
                  on_results=lambda rs: progress.update(len(rs), sum(r.usage.completion_tokens for r in rs)))
    progress.close()
    suffix = ".results.csv" if fmt == "csv" else ".results.jsonl"
    output = output or file.with_name(file.name.removesuffix(".jsonl") + suffix)
    rows = _export(ctx, job.id, output, fmt)
    with ctx.db.read() as s:
        from .service import get_job

        job = get_job(s, job.id)
    click.echo(f"{job.succeeded} succeeded, {job.failed} failed; {rows} result(s) written to", err=True)
    click.echo(str(output))


@cli.command()
@click.option("--host", envvar="LLMBATCH_HOST", default="127.0.0.1", show_default=True,
              help="Address to bind [env LLMBATCH_HOST]; without API keys only a loopback address.")
@click.option("--port", envvar="LLMBATCH_PORT", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="[env LLMBATCH_PORT]")
@click.option("--loglevel", default="info", show_default=True)
@pass_ctx
@handle_errors
def serve(ctx, host, port, loglevel):
    """Serve the OpenAI Files and Batches API, the dashboard and /metrics over HTTP.

    API keys come only from the environment (LLMBATCH_API_KEYS, comma-separated), never a flag,
    so they stay out of process listings and shell history.
    """
    import ipaddress
    import logging

    import uvicorn

    from .api.app import create_app
    from .api.auth import keys_from_env

    keys = keys_from_env()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not keys and not loopback:
        raise click.ClickException(
            f"refusing to serve on {host} without API keys: anyone who can reach it could read and cancel every "
            f"job. Set LLMBATCH_API_KEYS, or bind a loopback address such as 127.0.0.1")
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(ctx.settings, keys)
    click.echo(f"llmbatch serve: http://{host}:{port}/ ({len(keys)} API key(s)), database "
               f"{redact_url(ctx.settings.database_url)}, broker {redact_url(ctx.settings.broker_url)}", err=True)
    uvicorn.run(app, host=host, port=port, log_level=loglevel.lower())


@cli.group()
def db():
    """Database schema commands."""


@db.command()
@click.option("--revision", default="head", show_default=True)
@pass_ctx
@handle_errors
def upgrade(ctx, revision):
    """Apply migrations (other commands also do this when the schema is missing or old)."""
    from .db import Database

    database = Database(ctx.settings.database_url)
    database.upgrade(revision)
    click.echo(f"database {redact_url(ctx.settings.database_url)} is at {revision}")


def main() -> None:
    cli(prog_name="llmbatch")


if __name__ == "__main__":
    main()
