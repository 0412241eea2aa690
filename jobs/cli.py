"""The `llmbatch` command line. submit/status/export never import torch, so they start fast."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from .exceptions import BrokerUnavailable, LLMBatchError
from .inputs import PARAM_NAMES, validate_params
from .settings import Limits, Settings, redact_url

FINAL_JOB_STATES = ("completed", "cancelled", "failed")
ITEM_STATES = ("pending", "running", "succeeded", "failed", "cancelled")


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
            from .db import driver_error, is_unavailable

            orig = driver_error(exc)
            if orig is not None:
                url = redact_url(click.get_current_context().find_object(Context).settings.database_url)
                cause = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
                # "Unavailable" only when it is; a deadlock or a missing table is named as itself.
                what = "database unavailable" if is_unavailable(exc) else f"database error ({type(orig).__name__})"
                raise click.ClickException(f"{what} at {url}: {cause}") from exc
            raise

    return wrapper


def _checked(name: str):
    """A callback that checks a flag with the same rules as a per-line parameter (jobs/inputs.py)."""

    def check(ctx, param, value):
        if value is None or value == ():
            return value
        try:
            validate_params({name: list(value) if param.multiple else value}, limits=Limits())
        except ValueError as exc:
            raise click.BadParameter(str(exc).removeprefix(f"{name!r} ")) from None
        return value

    return check


def generation_options(fn):
    """The job-wide generation defaults; per-line parameters override them."""
    options = [
        click.option("--max-tokens", type=int, callback=_checked("max_tokens"),
                     help="Most new tokens per item (default 256)."),
        click.option("--temperature", type=float, callback=_checked("temperature"),
                     help="0 to 2; 0 = greedy (default)."),
        click.option("--top-p", type=float, callback=_checked("top_p"),
                     help="Nucleus sampling: keep the smallest set of tokens whose probability reaches P (0 < P <= 1)."),
        click.option("--top-k", type=int, callback=_checked("top_k"),
                     help="Sample only from the K most likely tokens (0 = off)."),
        click.option("--seed", type=int, callback=_checked("seed"),
                     help="Random seed for sampling, so a run with temperature > 0 can be repeated."),
        click.option("--stop", multiple=True, callback=_checked("stop"),
                     help="Stop string; repeat for several (at most 4)."),
        # issue 10: job-wide structured output; a line's own response_format overrides it.
        click.option("--response-format", type=click.Choice(["text", "json"]),
                     help="json: every output is one JSON object."),
        click.option("--json-schema", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Every output is JSON valid against the schema in this file."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def adapter_option(fn):
    return click.option("--adapter", "adapter_specs", multiple=True, metavar="NAME=PATH",
                        help="A PEFT LoRA adapter (local directory or hub id) lines select by NAME; "
                             "a bare PATH runs every line without its own. Repeatable.")(fn)


def collect_adapters(specs):
    """--adapter values -> Adapters; a malformed one is a usage error (exit 2)."""
    from .adapters import parse_specs

    try:
        return parse_specs(specs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def collect_params(kw: dict) -> dict:
    params = {k: kw.pop(k, None) for k in PARAM_NAMES}
    params["stop"] = list(params["stop"]) or None
    # --response-format (popped above under the parameter's name) and --json-schema make one response_format
    params["response_format"] = _response_format_flags(params["response_format"], kw.pop("json_schema"))
    params = {k: v for k, v in params.items() if v is not None}
    try:  # the same checks as a line's, so flags and lines share their ranges
        validate_params(params, "job parameters")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return params


def _response_format_flags(kind: str | None, schema_file: Path | None) -> dict | None:
    if schema_file is not None:
        if kind is not None:
            raise click.UsageError("give only one of --response-format and --json-schema")
        try:
            schema = json.loads(schema_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise click.BadParameter(f"{schema_file}: not a JSON file ({e})", param_hint="--json-schema") from None
        # OpenAI's name pattern; the file's stem is the natural name, cleaned to fit it.
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in schema_file.stem)[:64] or "schema"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    return {"type": "json_object"} if kind == "json" else {"type": "text"} if kind == "text" else None


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
    from . import work
    from .queues import enqueue_chunks

    try:
        enqueue_chunks(model, [(job_id, c) for c in chunk_ids], ctx.settings.broker_url)
    except Exception as exc:
        raise BrokerUnavailable(
            f"job {job_id} is stored, but its work could not be queued at "
            f"{redact_url(ctx.settings.broker_url)} ({type(exc).__name__}: {exc}); "
            f"start the broker and run `llmbatch retry {job_id}`") from exc
    with ctx.db.write() as s:
        work.mark_enqueued(s, chunk_ids)


def _unserved(ctx: Context, model: str, status: str) -> str | None:
    """Why a job no live worker can run will wait (with the models served); None if one can."""
    if status in FINAL_JOB_STATES:
        return None
    from . import workers

    with ctx.db.read() as s:
        return workers.unserved_warning(s, model)


PROGRESS_MIN_BYTES = 16 * 1024**2  # files larger than this show a progress bar on stderr while they are stored


def task_option(fn):
    """issue 21: a job either generates text or embeds; by default the model (a sentence-transformers
    folder embeds) or the file's first valid line decides."""
    return click.option("--task", type=click.Choice(["generate", "embed"]), envvar="LLMBATCH_TASK",
                        help="What every line asks for (default: the model's kind, else the first valid line's) "
                             "[env LLMBATCH_TASK].")(fn)


def _store(ctx: Context, file: Path, *, model, name, params, strict, adapters=None, task=None):
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
                                           strict=strict, source=str(file), on_line=on_line, adapters=adapters,
                                           task=task)
        finally:
            if progress:
                progress.close()  # end the bar's line, so an error message starts on a line of its own
    return submitted


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", envvar="LLMBATCH_MODEL", help="Model id or path [env LLMBATCH_MODEL].")
@click.option("--name", help="A name to find the job by (status, export, cancel and retry take it for the id).")
@click.option("--strict", is_flag=True, help="Refuse the whole file if any line is bad.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the id.")
@generation_options
@adapter_option
@task_option
@pass_ctx
@handle_errors
def submit(ctx, file, model, name, strict, as_json, adapter_specs, task, **kw):
    """Validate and store FILE as a job, and queue its work; prints the job id."""
    from .service import job_summary

    submitted = _store(ctx, file, model=model, name=name, params=collect_params(kw), strict=strict,
                       adapters=collect_adapters(adapter_specs), task=task)
    job = submitted.job
    _enqueue(ctx, job.model, job.id, submitted.chunk_ids)
    warning = _unserved(ctx, job.model, job.status.value)
    if submitted.bad_lines:
        click.echo(f"{submitted.bad_lines} bad line(s) stored as failed items; see `llmbatch export {job.id} "
                   f"--only failed`", err=True)
    if as_json:  # the warning travels in the object; stdout stays one JSON value
        click.echo(json.dumps({**job_summary(job), "chunks": len(submitted.chunk_ids), "warning": warning}))
        return
    if warning:
        click.echo(f"warning: {warning}", err=True)
    click.echo(job.id)


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
    name = f" ({job['name']})" if job.get("name") else ""
    return (f"{job['id']}{name}  {job['status']:<10}  {job['succeeded']}/{job['total']} succeeded, {job['failed']} failed, "
            f"{job['pending']} pending, {job['running']} running, {job['cancelled']} cancelled")


def _status_table(jobs: list[dict]) -> str:
    lines = [f"{'ID':<20}  {'NAME':<16}  {'STATUS':<10}  {'MODEL':<28}  {'DONE':>15}  {'FAILED':>7}  CREATED"]
    for j in jobs:
        done = f"{j['succeeded'] + j['failed'] + j['cancelled']}/{j['total']}"
        name = j["name"] or "-"
        name = name if len(name) <= 16 else name[:15] + "…"
        lines.append(f"{j['id']:<20}  {name:<16}  {j['status']:<10}  {j['model'][:28]:<28}  {done:>15}  "
                     f"{j['failed']:>7}  {j['created_at'][:19]}")
    return "\n".join(lines)


@cli.command()
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object for a job, a list for the table.")
@click.option("--watch", is_flag=True, help="Refresh until the job (or every job in the table) finishes.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds between --watch refreshes.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Jobs in the table.")
@pass_ctx
@handle_errors
def status(ctx, job, as_json, watch, interval, limit):
    """Show one job's state and counts (JOB is an id or a unique name), or a table of recent jobs."""
    while True:
        if job:
            summary = _read_summary(ctx, job)
            click.echo(json.dumps(summary) if as_json else _status_line(summary))
            finished = summary["status"] in FINAL_JOB_STATES
            if not finished and not as_json and summary["model"] not in _served(ctx):
                click.echo(f"warning: no live worker serves model {summary['model']!r}; the job waits for one "
                           f"(`llmbatch workers` lists those running)", err=True)
        else:
            jobs = _read_table(ctx, limit)
            if watch and not as_json and sys.stdout.isatty():
                click.clear()
            click.echo(json.dumps(jobs) if as_json else _status_table(jobs) + "\n" + _workers_line(_served(ctx)))
            finished = all(j["status"] in FINAL_JOB_STATES for j in jobs)
        if not watch or finished:
            return
        time.sleep(interval)


def _served(ctx: Context) -> dict[str, int]:
    """{model: live workers holding it}: the driver alone first, as _read_summary does."""
    from . import quickread, workers

    served = quickread.served_models(ctx.settings.database_url, workers.LIVE_SECONDS)
    if served is not None:
        return served
    with ctx.db.read() as s:
        counts: dict[str, int] = {}
        for w, _ in workers.list_workers(s):
            counts[w.model] = counts.get(w.model, 0) + 1
        return counts


def _workers_line(served: dict[str, int]) -> str:
    if not served:
        return "workers: none live; queued jobs wait until `llmbatch worker` starts"
    return "workers: " + ", ".join(f"{n} on {m}" for m, n in served.items())


def _read_summary(ctx: Context, ref: str) -> dict:
    from . import quickread

    # Reads one row: the counters are kept in step with the items, never counted. The driver alone
    # first, for a fast start; SQLAlchemy when that path cannot tell (quickread.py).
    summary = quickread.job_summary(ctx.settings.database_url, ref)
    if summary is not None:
        return summary
    from . import service

    with ctx.db.read() as s:
        return service.job_summary(service.get_job(s, ref))


def _read_table(ctx: Context, limit: int) -> list[dict]:
    from . import quickread

    jobs = quickread.recent_jobs(ctx.settings.database_url, limit)
    if jobs is not None:
        return jobs
    from . import service

    with ctx.db.read() as s:
        return [service.job_summary(j) for j in service.list_jobs(s, limit)]


@cli.command()
@click.argument("job")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="File to write; default stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "openai", "csv", "parquet"]), default="jsonl",
              show_default=True, help="parquet: embedding jobs only, needs -o.")
@click.option("--only", type=click.Choice(ITEM_STATES), help="Only rows with this status.")
@pass_ctx
@handle_errors
def export(ctx, job, output, fmt, only):
    """Stream a job's results, in line order (JOB is an id or a unique name)."""
    _export(ctx, job, output, fmt, only)


def _export(ctx: Context, job_ref: str, output: Path | None, fmt: str, only: str | None = None) -> int:
    from . import service
    from .export import export as write

    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet writes a binary file: give -o FILE")
    with ctx.db.read() as s:
        job = service.get_job(s, job_ref)
        if job.status.value not in FINAL_JOB_STATES:
            # Its rows are a snapshot: some still say pending or running.
            click.echo(f"warning: job {job.id} is {job.status.value}, not finished: {job.pending} pending and "
                       f"{job.running} running of {job.total}; those rows are exported with that status", err=True)
        if output is None:
            return write(s, job, sys.stdout, fmt, only)
        tmp = output.with_name(output.name + ".part")
        try:
            out = (open(tmp, "wb") if fmt == "parquet"  # issue 21: binary
                   else open(tmp, "w", encoding="utf-8", newline="", buffering=1 << 20))
        except OSError as exc:
            raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from exc
        try:
            with out:
                rows = write(s, job, out, fmt, only)
            tmp.replace(output)  # never leave a half-written export under the real name
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from exc
        except LLMBatchError:
            tmp.unlink(missing_ok=True)  # refused (issue 21: parquet of a text job): nothing half-written
            raise
        return rows


@cli.command()
@click.argument("job")
@pass_ctx
@handle_errors
def cancel(ctx, job):
    """Cancel a job's pending work; finished results are kept (JOB is an id or a unique name)."""
    from . import service

    with ctx.db.write() as s:
        job = service.cancel(s, job)
    # A claimed chunk's items are all `running`, so on a small job most of what stops is running.
    stopping = f", {job.running} running item(s) stop after the micro-batch in flight" if job.running else ""
    click.echo(f"{job.id} {job.status.value}: {job.cancelled} item(s) cancelled{stopping}; "
               f"{job.succeeded + job.failed} finished result(s) kept. `llmbatch retry {job.id}` requeues "
               f"the cancelled items once the job is cancelled")


@cli.command()
@click.argument("job")
@pass_ctx
@handle_errors
def retry(ctx, job):
    """Requeue a finished job's failed and cancelled items (JOB is an id or a unique name)."""
    from . import service

    with ctx.db.write() as s:
        job = service.get_job(s, job)
        model, job_id = job.model, job.id
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


def _ago(iso: str) -> str:
    from datetime import datetime, timezone

    seconds = max(0, int((datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago" if seconds < 7200 else f"{seconds // 3600}h ago"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--all", "include_gone", is_flag=True,
              help="Also workers not seen lately (stopped by a crash or cut off; forgotten after a day).")
@pass_ctx
@handle_errors
def workers(ctx, as_json, include_gone):
    """List the live workers: host, GPU, model, adapters loaded, when started and last seen."""
    from . import workers as workers_

    with ctx.db.read() as s:
        rows = [workers_.summary(w, live) for w, live in workers_.list_workers(s, include_gone)]
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no live workers; start one with `llmbatch worker --model MODEL`")
        return
    lines = [f"{'WORKER':<28}  {'MODEL':<32}  {'GPU':<24}  {'ADAPTERS':<20}  {'STARTED':<19}  LAST SEEN"]
    for w in rows:
        adapters = ",".join(w["adapters"]) or "-"
        seen = _ago(w["last_seen"]) + ("" if w["live"] else " (gone)")
        lines.append(f"{w['id'][:28]:<28}  {w['model'][:32]:<32}  {(w['gpu'] or '-')[:24]:<24}  {adapters[:20]:<20}  "
                     f"{w['started_at'][:19]:<19}  {seen}")
    click.echo("\n".join(lines))


ENGINE_LABELS = {"model": "the model", "echo": "ECHO (a test engine: echoes prompts, loads no model)"}


@cli.command()
@click.option("--model", envvar="LLMBATCH_MODEL", help="Model to hold [env LLMBATCH_MODEL].")
@click.option("--gpus", envvar="LLMBATCH_GPUS",
              help="`all`, a count N (GPUs 0..N-1) or a list such as `0,1` (`3,` for GPU 3 alone): one worker "
                   "process pinned to each GPU [env LLMBATCH_GPUS]. Default: one process on the devices "
                   "this one sees.")
@click.option("--concurrency", "-c", default=1, show_default=True, help="Worker processes, each with the model.")
@click.option("--engine", "engine_kind", type=click.Choice(["model", "echo"]), envvar="LLMBATCH_ENGINE",
              help="`echo` skips the model: for testing and benchmarking the orchestration only "
                   "[env LLMBATCH_ENGINE; default model].")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", "-n", help="Celery node name (default llmbatch@HOST).")
@pass_ctx
@handle_errors
def worker(ctx, model, gpus, concurrency, engine_kind, loglevel, hostname):
    """Start a Celery worker that holds the model and takes its queue."""
    import logging
    import tempfile

    model = model or ctx.settings.model
    engine_kind = engine_kind or ctx.settings.engine
    if gpus is not None:
        from llmbatch.worker import gpus as gpu_procs

        if concurrency != 1:
            raise click.UsageError("--gpus starts one process per GPU; leave --concurrency at 1")
        devices = gpu_procs.parse(gpus)
        ctx.db  # create or upgrade the schema once, before the processes race to
        click.echo(f"llmbatch worker: one process per GPU, on GPU(s) {','.join(devices)}", err=True)
        code = gpu_procs.run(devices, ctx.settings, model=model, engine=engine_kind, loglevel=loglevel,
                             hostname=hostname)
        if code:
            raise click.ClickException(f"a GPU worker process exited with code {code}; stopped the others")
        return
    if engine_kind == "model":  # a name that can never load fails now, before any process starts
        from llmbatch.worker.engines import check_model

        check_model(model)
    # The pool's child processes read these when they load the model.
    os.environ.update(LLMBATCH_MODEL=model, LLMBATCH_ENGINE=engine_kind,
                      LLMBATCH_DATABASE_URL=ctx.settings.database_url, LLMBATCH_BROKER_URL=ctx.settings.broker_url)
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    ctx.db  # create or upgrade the schema once, before any child races to
    from llmbatch.worker import app as celery_app
    from llmbatch.worker import tasks  # noqa: F401  (registers the task)

    # Celery says "ready." once its pool has started, before any child has loaded the model; each
    # child logs its own "ready" once it has (worker/tasks.py).
    logging.getLogger("celery.apps.worker").addFilter(lambda r: not r.getMessage().endswith(" ready."))
    app = celery_app.configure(ctx.settings.broker_url)
    queue = celery_app.queue_name(model)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    click.echo(f"llmbatch worker: model {model} on queue {queue}, engine {ENGINE_LABELS[engine_kind]}, "
               f"broker {redact_url(ctx.settings.broker_url)}, database {redact_url(ctx.settings.database_url)}"
               + (f", CUDA_VISIBLE_DEVICES={devices}" if devices is not None else ""), err=True)
    # Each pool process loads the model before it takes a message; one that cannot writes why
    # here and stops the worker (worker/tasks.py), so the worker exits with that one error.
    failfile = Path(tempfile.mkdtemp(prefix="llmbatch-worker-")) / "model-failed"
    os.environ[tasks.FAILFILE_ENV] = str(failfile)
    streams = sys.stdout, sys.stderr
    try:
        app.worker_main(["worker", "-Q", queue, "-c", str(concurrency), "--loglevel", loglevel,
                         "-n", hostname or "llmbatch@%h", "--without-gossip", "--without-mingle",
                         "--without-heartbeat"])
    finally:
        sys.stdout, sys.stderr = streams  # Celery redirected them to its logger
        failed = failfile.read_text() if failfile.exists() else None
        failfile.unlink(missing_ok=True)
        failfile.parent.rmdir()
    if failed:
        raise click.ClickException(failed)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Results file (default: FILE's name with .results.jsonl, or .results.csv).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "openai", "csv", "parquet"]), default="jsonl",
              show_default=True, help="parquet: embedding jobs only.")
@click.option("--model", envvar="LLMBATCH_MODEL", help="Model id or path [env LLMBATCH_MODEL].")
@click.option("--name", help="A name to find the job by (status, export, cancel and retry take it for the id).")
@click.option("--strict", is_flag=True, help="Refuse the whole file if any line is bad.")
@click.option("--engine", "engine_kind", type=click.Choice(["model", "echo"]), envvar="LLMBATCH_ENGINE", hidden=True)
@generation_options
@adapter_option
@task_option
@pass_ctx
@handle_errors
def run(ctx, file, output, fmt, model, name, strict, engine_kind, adapter_specs, task, **kw):
    """Submit FILE, generate every line in this process, and export: no services needed."""
    from llmbatch.worker.engines import make_engine
    from llmbatch.worker.runner import run_chunk

    from . import service
    from .progress import Progress

    engine_kind = engine_kind or ctx.settings.engine
    if engine_kind == "model":  # a name that can never load: one line, and no job is made
        from llmbatch.worker.engines import check_model

        check_model(model or ctx.settings.model)
    submitted = _store(ctx, file, model=model, name=name, params=collect_params(kw), strict=strict,
                       adapters=collect_adapters(adapter_specs), task=task)
    job = submitted.job
    click.echo(f"job {job.id}: {job.total} line(s), {submitted.bad_lines} bad; loading {job.model}", err=True)
    try:
        engine = make_engine(job.model, dataclasses.replace(ctx.settings, engine=engine_kind))
    except Exception as exc:  # the model is there but does not load: the job it made must not wait forever
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = f"cannot load model {job.model!r}: {type(exc).__name__}: {cause}"
        with ctx.db.write() as s:
            service.fail_job(s, job.id, "model_unavailable", message)
        raise click.ClickException(f"{message} (job {job.id} is marked failed)") from exc
    progress = Progress(job.total)
    progress.update(submitted.bad_lines)
    name = f"run:{os.getpid()}" + (" [echo engine]" if engine_kind == "echo" else "")
    for chunk_id in submitted.chunk_ids:
        run_chunk(ctx.db, engine, chunk_id, name, ctx.settings.lease_seconds,
                  on_results=lambda rs: progress.update(len(rs), sum(r.usage.completion_tokens for r in rs)))
    progress.close()
    suffix = {"csv": ".results.csv", "parquet": ".results.parquet"}.get(fmt, ".results.jsonl")
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

    Exits 0 after a clean shutdown on SIGTERM or SIGINT, 1 when it cannot start (port in use,
    no keys on a public address, database unreachable), 2 on a usage error.
    """
    import ipaddress
    import logging

    from .api.app import create_app
    from .api.auth import admin_keys_from_env, keys_from_env

    keys, admin_keys = keys_from_env(), admin_keys_from_env()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not (keys or admin_keys) and not loopback:
        raise click.ClickException(
            f"refusing to serve on {host} without API keys: anyone who can reach it could read and cancel every "
            f"job. Set LLMBATCH_API_KEYS, or bind a loopback address such as 127.0.0.1")
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Bound here, before the app starts: a busy port is one clear line and exit 1 (uvicorn would exit 3).
    sock = _listen(host, port)
    app = create_app(ctx.settings, keys, admin_keys=admin_keys)
    click.echo(f"llmbatch serve: http://{host}:{port}/ ({len(keys)} API key(s), {len(admin_keys)} admin key(s)), "
               f"database {redact_url(ctx.settings.database_url)}, broker {redact_url(ctx.settings.broker_url)}",
               err=True)
    if not _run_server(app, sock, loglevel):
        raise click.ClickException("the server did not start (see the log above)")


def _listen(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise click.ClickException(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _run_server(app, sock, loglevel: str) -> bool:
    """Serve until SIGTERM or SIGINT; True after a clean shutdown, False if the app did not start."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the stopping signal once shut down, so a SIGTERM'd server would end
            # "killed by SIGTERM" (143 in a shell, a failure to scripts). The shutdown was clean: exit 0.
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    server = Server(uvicorn.Config(app, log_level=loglevel.lower()))
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's exit 3 when the app's start-up failed; it logged why
        return False
    return server.started


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
