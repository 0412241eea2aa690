"""Adapters named on a job (jobs/adapters.py): flags, submit-time checks, per-line resolution, export.

No model here: the engine side is tests/test_lora.py.
"""

import csv
import io
import json

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from llmbatch.jobs import export, service, work
from llmbatch.jobs.adapters import AdapterNotFound, Adapters, check_sources, parse_specs
from llmbatch.jobs.cli import cli
from llmbatch.jobs.models import Item, ItemStatus, Job
from llmbatch.worker.runner import to_request
from tests.support import write_jsonl


@pytest.fixture
def adapter_dir(tmp_path):
    d = tmp_path / "sql-lora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return d


def test_parse_specs_names_and_default():
    a = parse_specs(["sql=/a/sql", "/a/chat", "hub=org/name"])
    assert a.names == {"sql": "/a/sql", "/a/chat": "/a/chat", "hub": "org/name"}
    assert a.default == "/a/chat"
    with pytest.raises(ValueError, match="only one adapter can be the default"):
        parse_specs(["/a", "/b"])
    with pytest.raises(ValueError, match="given twice"):
        parse_specs(["x=/a", "x=/b"])
    with pytest.raises(ValueError, match="PATH is empty"):
        parse_specs(["x="])


def test_check_sources(adapter_dir, tmp_path):
    ok = check_sources(Adapters({"sql": str(adapter_dir), "hub": "org/some-lora"}))
    assert ok.names == {"sql": str(adapter_dir.resolve()), "hub": "org/some-lora"}
    with pytest.raises(AdapterNotFound, match="does not exist"):
        check_sources(Adapters({"x": str(tmp_path / "missing")}))
    with pytest.raises(AdapterNotFound, match="does not exist"):
        check_sources(Adapters({"x": "./rel/missing"}))  # looks like org/name but is a relative path
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFound, match="no adapter_config.json"):
        check_sources(Adapters({"x": str(tmp_path / "empty")}))


LINES = [
    {"custom_id": "named", "prompt": "a", "adapter": "sql"},
    {"custom_id": "default", "prompt": "b"},
    {"custom_id": "oa", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "sql", "messages": [{"role": "user", "content": "c"}]}},
    {"custom_id": "oa-other", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "d"}]}},
    {"custom_id": "unknown", "prompt": "e", "adapter": "nope"},
    {"custom_id": "wrong-type", "prompt": "f", "adapter": 3},
]


def _submit(db, settings, tmp_path, adapters, lines=LINES):
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    with db.write() as s, open(path, "rb") as fp:
        return service.submit(s, fp, settings, adapters=adapters)


def test_submit_resolves_each_lines_adapter(db, settings, tmp_path, adapter_dir):
    base = tmp_path / "base-lora"
    base.mkdir()
    (base / "adapter_config.json").write_text("{}")
    out = _submit(db, settings, tmp_path, parse_specs([f"sql={adapter_dir}", str(base)]))
    with db.read() as s:
        job = s.get(Job, out.job.id)
        items = {i.custom_id: i for i in s.scalars(select(Item).where(Item.job_id == job.id))}
        assert job.adapters == {"sql": str(adapter_dir.resolve()), str(base): str(base.resolve())}
        assert items["named"].request["adapter"] == "sql"
        assert items["default"].request["adapter"] == str(base)  # the bare PATH is the default
        assert items["oa"].request["adapter"] == "sql"  # body.model names a registered adapter
        assert items["oa-other"].request["adapter"] == str(base)
        assert items["unknown"].status is ItemStatus.failed and items["unknown"].error_code == "invalid_input"
        assert items["unknown"].error_message == (
            f"line 5: adapter 'nope' is not registered on this job (registered: 'sql', '{base}'; "
            "add it with --adapter nope=PATH)")
        assert "'adapter' must be a non-empty string" in items["wrong-type"].error_message
        # The worker hands the engine the adapter's source, not its name.
        assert to_request(items["named"], job).adapter == str(adapter_dir.resolve())
        assert to_request(items["default"], job).adapter == str(base.resolve())


def test_a_line_naming_an_adapter_on_a_job_without_any_is_bad(db, settings, tmp_path):
    out = _submit(db, settings, tmp_path, None, LINES[:2])
    with db.read() as s:
        items = s.scalars(select(Item).where(Item.job_id == out.job.id).order_by(Item.line)).all()
        assert s.get(Job, out.job.id).adapters is None
    assert "not registered on this job (registered: none" in items[0].error_message
    assert items[1].request.get("adapter") is None and to_request(items[1], out.job).adapter is None


def test_missing_path_is_refused_at_submit_and_nothing_stored(db_url, quiet_broker_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    invoke = lambda *a: CliRunner().invoke(  # noqa: E731
        cli, ["--database-url", db_url, "--broker-url", quiet_broker_url, *map(str, a)])
    result = invoke("submit", path, "--adapter", f"sql={tmp_path / 'nowhere'}")
    assert result.exit_code == 1
    assert f"adapter 'sql': {tmp_path / 'nowhere'} does not exist" in result.output
    assert json.loads(invoke("status", "--json").stdout) == []  # no job stored
    result = invoke("submit", path, "--adapter", "/a", "--adapter", "/b")
    assert result.exit_code == 2 and "only one adapter can be the default" in result.output


def _finish(db, out):
    for chunk_id in out.chunk_ids:
        with db.write() as s:
            chunk = work.claim_chunk(s, chunk_id, "w", 30)
            items = work.running_items(s, chunk_id)
        rows = [work.ItemResult(item_id=i.id, status=ItemStatus.succeeded, output="out", finish_reason="stop",
                                prompt_tokens=1, completion_tokens=1) for i in items]
        with db.write() as s:
            work.record_results(s, chunk, "w", rows, 30)
    with db.read() as s:
        return s.get(Job, out.job.id)


def _export(db, job, fmt):
    buf = io.StringIO()
    with db.read() as s:
        export.export(s, job, buf, fmt)
    return buf.getvalue()


def test_export_carries_the_adapter(db, settings, tmp_path, adapter_dir):
    job = _finish(db, _submit(db, settings, tmp_path, parse_specs([f"sql={adapter_dir}"])))
    native = [json.loads(x) for x in _export(db, job, "jsonl").splitlines()]
    assert [r["adapter"] for r in native] == ["sql", None, "sql", None, None, None]
    rows = list(csv.DictReader(io.StringIO(_export(db, job, "csv"))))
    assert [r["adapter"] for r in rows] == ["sql", "", "sql", "", "", ""]
    openai = {r["custom_id"]: r for r in map(json.loads, _export(db, job, "openai").splitlines())}
    assert openai["named"]["response"]["body"]["model"] == "sql"  # the adapter's name is the model
    assert openai["oa"]["response"]["body"]["model"] == "sql"
    assert openai["oa-other"]["response"]["body"]["model"] == job.model  # what ran, not body.model
    assert openai["default"]["response"]["body"]["model"] == job.model


def test_export_of_a_job_without_adapters_has_no_adapter_field(db, settings, tmp_path):
    job = _finish(db, _submit(db, settings, tmp_path, None, LINES[1:4]))
    assert all("adapter" not in json.loads(x) for x in _export(db, job, "jsonl").splitlines())
    assert "adapter" not in _export(db, job, "csv").splitlines()[0]
