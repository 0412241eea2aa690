"""Export formats: native JSONL, OpenAI batch output, CSV with formula escaping; streamed in line order."""

import csv
import io
import json

from llmbatch.jobs import export, service, work
from llmbatch.jobs.models import ItemStatus, Job, utcnow
from tests.support import write_jsonl

LINES = [
    {"custom_id": "=cmd|' /C calc'!A0", "prompt": "a"},
    {"custom_id": "chat", "messages": [{"role": "user", "content": "b"}]},
    {"custom_id": "oa", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "c"}]}},
    {"custom_id": "text", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "d"}},
    '{"custom_id": "bad"',
]
OUTPUTS = ["+SUM(A1:A2)", "-1", "@here", "plain"]


def _finished_job(db, settings, path, result_of):
    """Submit the file and play the worker: every item gets result_of(item) (a work.ItemResult)."""
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, settings)
    for chunk_id in out.chunk_ids:
        with db.write() as s:
            chunk = work.claim_chunk(s, chunk_id, "w", 30)
            items = work.running_items(s, chunk_id)
        rows = [result_of(i) for i in items]
        with db.write() as s:
            work.record_results(s, chunk, "w", rows, 30)
    with db.read() as s:
        return s.get(Job, out.job.id)


def _done_job(db, settings, tmp_path):
    return _finished_job(db, settings, write_jsonl(tmp_path / "in.jsonl", LINES), lambda i: work.ItemResult(
        item_id=i.id, status=ItemStatus.succeeded, output=OUTPUTS[i.line - 1], finish_reason="stop",
        prompt_tokens=4, completion_tokens=2))


def _export(db, job, fmt, only=None):
    buf = io.StringIO()
    with db.read() as s:
        n = export.export(s, job, buf, fmt, only)
    return n, buf.getvalue()


def test_native_jsonl_has_one_row_per_line_in_order(db, settings, tmp_path):
    job = _done_job(db, settings, tmp_path)
    n, text = _export(db, job, "jsonl")
    rows = [json.loads(line) for line in text.splitlines()]
    assert n == len(rows) == 5
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert set(rows[0]) == set(export.COLUMNS)
    assert rows[1]["output"] == "-1" and rows[1]["status"] == "succeeded" and rows[1]["error"] is None
    assert rows[4]["status"] == "failed" and rows[4]["error"]["code"] == "invalid_input"
    assert rows[4]["error"]["message"].startswith("line 5:")
    assert rows[0]["started_at"] is None or rows[0]["started_at"].endswith("+00:00")


def test_only_filters_by_status(db, settings, tmp_path):
    job = _done_job(db, settings, tmp_path)
    n, text = _export(db, job, "jsonl", only="failed")
    assert n == 1 and json.loads(text)["custom_id"] == "line-5"  # invalid JSON: no id to read


def test_openai_format(db, settings, tmp_path):
    job = _done_job(db, settings, tmp_path)
    rows = [json.loads(line) for line in _export(db, job, "openai")[1].splitlines()]
    chat, text, bad = rows[2], rows[3], rows[4]
    assert chat["custom_id"] == "oa" and chat["error"] is None
    assert chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    # The model that ran, not the line's body.model ("gpt-4o"), as OpenAI reports it.
    assert body["object"] == "chat.completion" and body["model"] == job.model
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "@here"}
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert text["response"]["body"]["object"] == "text_completion"
    assert text["response"]["body"]["choices"][0]["text"] == "plain"
    assert bad["response"] is None and bad["error"]["code"] == "invalid_input"
    assert len({r["id"] for r in rows}) == 5


def test_csv_escapes_formula_cells_in_ids_and_outputs(db, settings, tmp_path):
    job = _done_job(db, settings, tmp_path)
    n, text = _export(db, job, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert n == len(rows) == 5 and list(rows[0]) == list(export.CSV_COLUMNS)
    assert rows[0]["custom_id"] == "'=cmd|' /C calc'!A0"
    assert [r["output"] for r in rows[:4]] == ["'+SUM(A1:A2)", "'-1", "'@here", "plain"]
    for row in rows:
        for value in row.values():
            assert not value.startswith(export.FORMULA_PREFIXES)


def test_escape_cell_covers_tab_and_carriage_return():
    assert export.escape_cell("\tx") == "'\tx"
    assert export.escape_cell("\rx") == "'\rx"
    assert export.escape_cell(None) == ""
    assert export.escape_cell(12) == "12"
    assert export.escape_cell("a=b") == "a=b"


# ---- issue 10: n choices and logprobs --------------------------------------------------------

LP = [{"token": "Hé", "logprob": -0.25, "top_logprobs": [{"token": "Hé", "logprob": -0.25}, {"token": "H", "logprob": -1.5}]},
      {"token": "!", "logprob": -0.5, "top_logprobs": [{"token": "!", "logprob": -0.5}, {"token": "?", "logprob": -2.0}]}]
RICH_LINES = [
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "c"}], "n": 2, "logprobs": True,
              "top_logprobs": 2}},
    {"custom_id": "text", "method": "POST", "url": "/v1/completions",
     "body": {"model": "m", "prompt": "d", "n": 2, "logprobs": 2}},
    {"custom_id": "native", "prompt": "e", "n": 2},
    {"custom_id": "plain", "messages": [{"role": "user", "content": "f"}]},
]


def _rich_job(db, settings, tmp_path):
    def result_of(i):
        params = i.request["params"]
        lp = LP if params.get("logprobs") else None
        more = [{"output": "Bye", "finish_reason": "length", "completion_tokens": 2, "logprobs": lp}] \
            if params.get("n", 1) > 1 else None
        return work.ItemResult(item_id=i.id, status=ItemStatus.succeeded, output="Hé!", finish_reason="stop",
                               prompt_tokens=4, completion_tokens=4 if more else 2, logprobs=lp, choices=more,
                               started_at=utcnow(), finished_at=utcnow())

    return _finished_job(db, settings, write_jsonl(tmp_path / "rich.jsonl", RICH_LINES), result_of)


def test_openai_package_parses_choices_and_logprobs(db, settings, tmp_path):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    job = _rich_job(db, settings, tmp_path)
    rows = [json.loads(line) for line in _export(db, job, "openai")[1].splitlines()]
    chat = ChatCompletion.model_validate(rows[0]["response"]["body"])
    assert [c.message.content for c in chat.choices] == ["Hé!", "Bye"]
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[1].finish_reason == "length"
    content = chat.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hé", "!"] and content[0].bytes == list("Hé".encode())
    assert [t.logprob for t in content[0].top_logprobs] == [-0.25, -1.5]
    assert chat.usage.completion_tokens == 4 and chat.usage.total_tokens == 8
    text = Completion.model_validate(rows[1]["response"]["body"])
    assert [c.text for c in text.choices] == ["Hé!", "Bye"]
    assert text.choices[0].logprobs.tokens == ["Hé", "!"]
    assert text.choices[0].logprobs.token_logprobs == [-0.25, -0.5]
    assert text.choices[0].logprobs.top_logprobs == [{"Hé": -0.25, "H": -1.5}, {"!": -0.5, "?": -2.0}]
    assert text.choices[0].logprobs.text_offset == [0, 2]
    native = Completion.model_validate(rows[2]["response"]["body"])  # a native prompt line: completions shape
    assert [c.text for c in native.choices] == ["Hé!", "Bye"] and native.choices[0].logprobs is None
    plain = ChatCompletion.model_validate(rows[3]["response"]["body"])
    assert len(plain.choices) == 1 and plain.choices[0].logprobs is None


def test_native_and_csv_carry_outputs_and_logprobs_only_when_asked(db, settings, tmp_path):
    job = _rich_job(db, settings, tmp_path)
    rows = [json.loads(line) for line in _export(db, job, "jsonl")[1].splitlines()]
    assert rows[0]["outputs"] == ["Hé!", "Bye"] and rows[0]["logprobs"] == LP and rows[0]["output"] == "Hé!"
    assert rows[2]["outputs"] == ["Hé!", "Bye"] and "logprobs" not in rows[2]
    assert set(rows[3]) == set(export.COLUMNS)  # a plain line: nothing new
    table = list(csv.DictReader(io.StringIO(_export(db, job, "csv")[1])))
    assert json.loads(table[0]["outputs"]) == ["Hé!", "Bye"] and json.loads(table[0]["logprobs"]) == LP
    assert table[3]["outputs"] == "" and table[3]["logprobs"] == ""


def test_rich_export_equals_the_reference_rendering(db, settings, tmp_path):
    from tests import export_reference

    job = _rich_job(db, settings, tmp_path)
    for fmt in export.FORMATS:
        with db.read() as s:
            expected = "".join(export_reference.render(export_reference.iter_items(s, job.id), fmt, job))
        assert _export(db, job, fmt)[1] == expected, fmt


def test_a_result_warning_is_exported_in_native_rows_and_csv_only(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, settings)
    with db.write() as s:
        chunk = work.claim_chunk(s, out.chunk_ids[0], "w", 30)
        items = work.running_items(s, chunk.id)
        work.record_results(s, chunk, "w", [
            work.ItemResult(item_id=items[0].id, status=ItemStatus.succeeded, output="x", finish_reason="length",
                            prompt_tokens=1, completion_tokens=1, warning="max_tokens 9 cut to 1: ..."),
            work.ItemResult(item_id=items[1].id, status=ItemStatus.succeeded, output="y", finish_reason="stop",
                            prompt_tokens=1, completion_tokens=1)], 30)
    with db.read() as s:
        job = s.get(Job, out.job.id)
    rows = [json.loads(line) for line in _export(db, job, "jsonl")[1].splitlines()]
    assert [r["warning"] for r in rows] == ["max_tokens 9 cut to 1: ...", None]
    table = list(csv.DictReader(io.StringIO(_export(db, job, "csv")[1])))
    assert [r["warning"] for r in table] == ["max_tokens 9 cut to 1: ...", ""]
    assert all("warning" not in json.loads(line) for line in _export(db, job, "openai")[1].splitlines())
