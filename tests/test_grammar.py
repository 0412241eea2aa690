"""Structured outputs on the bundled model: every stop-finished output validates (worker/engine/grammar.py)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from llmbatch.worker.engine import Request, SamplingParams
from llmbatch.worker.engine.grammar import GrammarError

ASK = [{"role": "user", "content": "Describe a small red fruit as JSON."}]

SCHEMAS = {
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "fruit": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                   "ripe": {"type": "boolean"}},
                  "required": ["name", "ripe"], "additionalProperties": False}},
        "required": ["fruit"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["sweet", "sour", "small"]}, "maxItems": 2}},
        "required": ["tags"], "additionalProperties": False},
    "integer": {"type": "object", "properties": {"grams": {"type": "integer", "minimum": 1, "maximum": 999}},
                "required": ["grams"], "additionalProperties": False},
}


def _params(response_format: dict, max_tokens: int = 40) -> SamplingParams:
    return SamplingParams.from_dict({"max_tokens": max_tokens, "response_format": response_format})


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_every_stop_finished_output_validates(engine):
    requests = [Request(id=name, messages=ASK, params=_params(_schema_format(name))) for name in SCHEMAS]
    requests.append(Request(id="json_object", messages=ASK, params=_params({"type": "json_object"}, 48)))
    # Sampled too: the mask, not the model's preference, keeps the output valid.
    requests += [Request(id=f"{name}-sampled", messages=ASK,
                         params=SamplingParams.from_dict({"max_tokens": 40, "temperature": 1.0, "seed": 3,
                                                          "response_format": _schema_format(name)}))
                 for name in ("enum", "integer")]
    results = {r.id: r for r in engine.generate_all(requests)}
    stopped = 0
    for rid, r in results.items():
        assert r.ok, (rid, r.error_message)
        if r.finish_reason == "stop":
            stopped += 1
            value = json.loads(r.output)
            schema = SCHEMAS.get(rid.removesuffix("-sampled"), {"type": "object"})
            jsonschema.validate(value, schema)
        else:
            assert r.finish_reason == "length" and r.usage.completion_tokens == 40 + 8 * (rid == "json_object")
    # Short schemas end well inside 40 tokens: these must have stopped, not been cut.
    assert all(results[k].finish_reason == "stop" for k in ("enum", "integer", "enum-sampled", "integer-sampled"))
    assert stopped >= 4


def test_an_uncompilable_schema_fails_only_its_request(engine):
    # Valid JSON Schema (so submit accepts it), but the $ref points nowhere: the compiler refuses it.
    broken = {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}
    requests = [Request(id="bad", messages=ASK, params=_params(
                    {"type": "json_schema", "json_schema": {"name": "b", "schema": broken}})),
                Request(id="good", messages=ASK, params=_params(_schema_format("enum")))]
    bad, good = engine.generate_all(requests)
    assert bad.error_code == "invalid_request"
    assert bad.error_message.startswith("response_format: the schema cannot be compiled: ")
    assert "missing" in bad.error_message and "/project/" not in bad.error_message
    assert good.ok and good.finish_reason == "stop"
    jsonschema.validate(json.loads(good.output), SCHEMAS["enum"])


def test_a_schema_is_compiled_once_per_process(engine):
    grammars = engine.grammars
    text = json.dumps({"type": "object", "properties": {"once": {"type": "integer"}}}, sort_keys=True)
    before = grammars.compiles
    first = grammars.compile("json_schema", text)
    assert grammars.compile("json_schema", text) is first
    assert grammars.compiles == before + 1
    with pytest.raises(GrammarError):
        grammars.compile("json_schema", json.dumps({"$ref": "#/nowhere"}))
    with pytest.raises(GrammarError):  # a failure is cached too
        grammars.compile("json_schema", json.dumps({"$ref": "#/nowhere"}))
    assert grammars.compiles == before + 2


def test_fill_allows_only_what_the_grammar_can_take_next(engine):
    grammars = engine.grammars
    compiled = grammars.compile("json_schema", json.dumps(SCHEMAS["enum"], sort_keys=True))
    matcher = grammars.matcher(compiled)
    vocab = grammars.vocab
    bitmask = torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32)
    grammars.fill([matcher], [1], bitmask)  # row 1 only
    assert torch.all(bitmask[0] == 0)
    bits = (bitmask[1][:, None] >> torch.arange(32)) & 1
    allowed = bits.reshape(-1)[:vocab].nonzero().flatten().tolist()
    assert allowed, "the grammar must allow something"
    assert all(engine.tokenizer.decode([t]).startswith("{") for t in allowed)


def test_a_job_end_to_end_through_run_chunk_and_the_openai_export(engine, sqlite_url, tmp_path):
    import io

    from openai.types.chat import ChatCompletion

    from llmbatch.jobs import export, service
    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Item, Job
    from llmbatch.jobs.settings import Settings
    from llmbatch.worker.runner import run_chunk
    from tests.support import write_jsonl

    enum = _schema_format("enum")
    broken = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"$ref": "#/definitions/missing"}}}
    lines = [
        {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": ASK, "max_tokens": 30, "response_format": enum, "n": 2,
                  "temperature": 1.0, "seed": 1, "logprobs": True, "top_logprobs": 2}},
        {"custom_id": "broken", "messages": ASK, "max_tokens": 30, "response_format": broken},
        {"custom_id": "plain", "prompt": "Hi", "max_tokens": 3},
    ]
    db = Database(sqlite_url)
    db.ensure_schema()
    settings = Settings.from_env(database_url=sqlite_url, broker_url="redis://127.0.0.1:1/0", chunk_size=8)
    with db.write() as s, open(write_jsonl(tmp_path / "in.jsonl", lines), "rb") as fp:
        out = service.submit(s, fp, settings)
    assert run_chunk(db, engine, out.chunk_ids[0], "w", 30).done == 3
    with db.read() as s:
        job = s.get(Job, out.job.id)
        items = {i.custom_id: i for i in s.query(Item).filter_by(job_id=job.id)}
        buf = io.StringIO()
        export.export(s, job, buf, "openai")
    assert items["broken"].error_code == "invalid_request" and "missing" in items["broken"].error_message
    assert items["plain"].status.value == "succeeded"
    ok = items["ok"]
    assert job.completion_tokens == sum(i.completion_tokens or 0 for i in items.values())
    body = ChatCompletion.model_validate(json.loads(buf.getvalue().splitlines()[0])["response"]["body"])
    assert len(body.choices) == 2 and body.usage.completion_tokens == ok.completion_tokens
    for choice in body.choices:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS["enum"])
        assert len(choice.logprobs.content) > 0
        assert all(len(t.top_logprobs) <= 2 for t in choice.logprobs.content)
    db.dispose()


def test_properties_come_in_the_schemas_order_and_padded_ids_are_never_allowed(engine):
    from llmbatch.worker.engine.grammar import Grammars

    tok = engine.tokenizer
    padded = len(tok) + 100  # a model whose logits are wider than its tokenizer
    grammars = Grammars(tok, padded, engine.eos_ids)
    schema = SamplingParams.from_dict({"response_format": {"type": "json_schema", "json_schema": {
        "name": "o", "schema": {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
                                "required": ["zeta", "alpha"], "additionalProperties": False}}}}).json_schema
    compiled = grammars.compile("json_schema", schema)

    def accepts(doc: str) -> bool:
        m = grammars.matcher(compiled)
        bitmask = torch.zeros(1, (padded + 31) // 32, dtype=torch.int32)
        for t in tok(doc, add_special_tokens=False)["input_ids"]:
            grammars.fill([m], [0], bitmask)
            bits = ((bitmask[0][:, None] >> torch.arange(32)) & 1).reshape(-1)
            assert not bits[len(tok):].any()
            if not bits[t] or not m.accept_token(t):
                return False
        return True

    assert accepts('{"zeta":1,"alpha":2}')
    assert not accepts('{"alpha":2,"zeta":1}')
