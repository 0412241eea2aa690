"""Every request feature in any combination through the slot loop (issue 19), drawn by hypothesis.

Each example is a random mix of lines (greedy or sampled; penalties, logprobs, n, json_object and
json_schema, logit_bias, stop strings, LoRA adapters, prompts sharing a long system prompt; max_tokens
1-8, EOS allowed) run with 2-4 rows at a time, so rows finish out of order, move down into freed slots
and are refilled, and fed in chunks through `more`, as the worker feeds the next chunk. It checks what
must hold for valid input: one result per line, no batch failure, n choices, logprobs that line up with
the tokens, JSON that the grammar accepts, and greedy tokens that do not depend on the batch.

Greedy tokens and the batch, on the CPU path: the logits of a row are not bitwise the same in another
batch (bitsandbytes' 4-bit matmuls and the padded prefill round differently by shape; measured up to
1.3e-5 in a token's logprob, sharing on or off). So a greedy line equals itself in another composition
token for token except where two candidates were within rounding of each other: the check allows a
divergence only at a step where the reference's top two logprobs are within TIE, and compares no
further (the rows have different histories from there).

Profiles: `ci` (default, derandomized, a fixed number of examples, about a minute) and `long`
(LLMBATCH_HYPOTHESIS_PROFILE=long, random, 200 examples) for local runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmbatch.worker.engine import Request, SamplingParams
from llmbatch.worker.engine.engine import Engine
from llmbatch.worker.engine.scheduler import Stats
from tests.test_lora import adapters, pristine  # noqa: F401 (module fixtures: two random LoRA adapters)
from tests.test_prefixes import QUESTIONS, SYSTEM

settings.register_profile("ci", max_examples=6, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile(os.environ.get("LLMBATCH_HYPOTHESIS_PROFILE", "ci"))
if os.environ.get("LLMBATCH_HYPOTHESIS_EXAMPLES"):  # any number, for a quick or a longer local run
    PROFILE = settings(PROFILE, max_examples=int(os.environ["LLMBATCH_HYPOTHESIS_EXAMPLES"]))

TIE = 1e-3  # logprob gap under which two greedy candidates count as tied (about 100x the rounding seen)
RAW = ["The capital of France is", "1, 2, 3, 4, 5,", "Hi", "A recipe for bread needs flour, water, salt and"]
ASK = "Describe a small red fruit as JSON."
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "ripe": {"type": "boolean"}},
          "required": ["color", "ripe"], "additionalProperties": False}
BIAS_TOKENS = [13, 28, 30, 253, 314, 260]  # common SmolLM2 tokens (".", "=", "?", " a", " of", ...)


@st.composite
def lines(draw, rows: int, adapter_names: list[str]) -> dict:
    """One line's request fields (a plain dict, so hypothesis shows it readably when it shrinks)."""
    kind = draw(st.sampled_from(["raw", "chat", "shared", "shared", "json"]))
    p: dict = {"max_tokens": draw(st.integers(1, 8))}
    if draw(st.booleans()):
        p.update(temperature=draw(st.sampled_from([0.7, 1.0])), top_p=draw(st.sampled_from([1.0, 0.9])),
                 top_k=draw(st.sampled_from([0, 20])), seed=draw(st.integers(0, 2**64 - 1)))
    if draw(st.integers(0, 2)) == 0:
        p.update(frequency_penalty=draw(st.sampled_from([0.0, 0.5])),
                 presence_penalty=draw(st.sampled_from([0.0, 0.4])),
                 repetition_penalty=draw(st.sampled_from([1.0, 1.3])))
    if draw(st.booleans()):
        p.update(logprobs=True, top_logprobs=draw(st.integers(0, 3)))
    p["n"] = draw(st.sampled_from([1, 1, 1, 2, 3]).filter(lambda n: n <= rows))
    if draw(st.integers(0, 2)) == 0:
        p["logit_bias"] = tuple(sorted({draw(st.sampled_from(BIAS_TOKENS)): draw(st.sampled_from([-100.0, 5.0]))}
                                       .items()))
    if kind == "json":  # stop strings would cut a JSON document: not drawn together
        p["response_format"] = draw(st.sampled_from(["json_object", "json_schema"]))
        if p["response_format"] == "json_schema":
            p["json_schema"] = json.dumps(SCHEMA)
    else:
        p["stop"] = draw(st.sampled_from([(), (), (".",), (" the", "\n")]))
    adapter = draw(st.sampled_from([None, None, *adapter_names]))
    if kind == "raw":
        text = {"prompt": draw(st.sampled_from(RAW))}
    elif kind == "chat":
        text = {"messages": [{"role": "user", "content": draw(st.sampled_from(RAW))}]}
    elif kind == "shared":  # a system prompt of over 100 tokens: lines drawn together share its prefill
        text = {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": draw(st.sampled_from(QUESTIONS))}]}
    else:
        text = {"messages": [{"role": "user", "content": ASK}]}
    return {**text, "params": p, "adapter": adapter}


def request(i: int, line: dict, **changes) -> Request:
    params = dataclasses.replace(SamplingParams(**line["params"]), **changes)
    return Request(id=i, prompt=line.get("prompt"), messages=line.get("messages"), params=params,
                   adapter=line["adapter"])


_engines: dict[tuple, Engine] = {}


def engine_for(engine, **overrides) -> Engine:
    """One engine per configuration for the whole module (runs after runs, as a worker's), counters reset."""
    key = tuple(sorted(overrides.items()))
    if key not in _engines:
        e = Engine(dataclasses.replace(engine.config, **overrides),
                   loaded=(engine.model, engine.tokenizer, engine.device, engine.dtype))
        e._grammars = engine.grammars  # compiled grammars are per tokenizer: compile each schema once
        _engines[key] = e
    e = _engines[key]
    e.stats = Stats()
    return e


def aligned(engine, entries: list[dict] | None, ids: list[int], top: int) -> None:
    """One logprobs entry per generated token, naming that token, with at most `top` alternatives."""
    assert entries is not None
    # A chat line may leave its end-of-turn token out of logprobs (it is not part of the text).
    assert len(entries) == len(ids) or (len(entries) == len(ids) - 1 and ids[-1] in engine.eos_ids)
    for e, t in zip(entries, ids):
        assert e["token"] == engine.tokenizer.decode([t])
        assert e["logprob"] <= 0.0 and len(e["top_logprobs"]) <= top


def same_greedy(got: list[int], ref: list[int], ref_logprobs: list[dict], tokenizer) -> None:
    """got == ref, but for a divergence at a near-tie in the reference (and nothing compared after it)."""
    for k, (a, b) in enumerate(zip(got, ref)):
        if a == b:
            continue
        assert k < len(ref_logprobs), f"diverged at {k} ({a} vs {b}) where the reference has no logprobs"
        entry = ref_logprobs[k]
        alt = next((x for x in entry["top_logprobs"] if x["token"] == tokenizer.decode([a])), None)
        assert alt is not None and entry["logprob"] - alt["logprob"] <= TIE, \
            f"greedy tokens diverge at {k}: {a} vs the reference's {b}, not a near-tie ({entry})"
        return
    assert len(got) == len(ref), (got, ref)


@settings(PROFILE)
@given(data=st.data())
def test_any_mix_of_features_runs_without_a_batch_failure(engine, adapters, data):  # noqa: F811
    rows = data.draw(st.integers(2, 4), label="max_batch_size")
    mix = data.draw(st.lists(lines(rows, sorted(adapters)), min_size=2, max_size=7), label="lines")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(mix) - 1), max_size=2), label="chunk starts"))
    for line in mix:
        if line["adapter"]:
            line["adapter"] = adapters[line["adapter"]]
    requests = [request(i, line) for i, line in enumerate(mix)]
    chunks = [requests[a:b] for a, b in zip([0, *cuts], [*cuts, len(requests)])]

    def more() -> list[Request]:
        return chunks.pop(0) if chunks else []

    e = engine_for(engine, max_batch_size=rows, flush_seconds=0.0)
    results = [r for batch in e.generate(chunks.pop(0), more=more) for r in batch]
    assert Counter(r.id for r in results) == Counter(range(len(mix)))  # exactly one result per line
    assert e.stats.batch_failures == 0 and e.stats.feed_errors == 0
    by_id = {r.id: r for r in results}
    for i, line in enumerate(mix):
        r, p = by_id[i], requests[i].params
        assert r.ok, (line, r.error_code, r.error_message)
        choices = [(r.token_ids, r.logprobs, r.output, r.finish_reason)] + \
            [(c.token_ids, c.logprobs, c.output, c.finish_reason) for c in r.choices]
        assert len(choices) == p.n
        assert r.usage.completion_tokens == sum(len(ids) for ids, *_ in choices)
        for ids, logprobs, output, finish in choices:
            assert 0 < len(ids) <= p.max_tokens and finish in ("stop", "length")
            if p.logprobs:
                aligned(engine, logprobs, ids, p.top_logprobs)
            else:
                assert logprobs is None
            if p.response_format != "text":
                grammar = engine.grammars.compile(p.response_format, p.json_schema)
                matcher = engine.grammars.matcher(grammar)
                assert all(matcher.accept_token(t) for t in ids if t not in engine.eos_ids), (line, output)
                if finish == "stop":
                    doc = json.loads(output)
                    if p.json_schema:
                        jsonschema.validate(doc, SCHEMA)

    # The greedy lines again, in another composition: alone among themselves, in reverse order, eight
    # rows, sharing off, no feed; with their top two logprobs, to tell a near-tie from a difference.
    greedy = [i for i, line in enumerate(mix) if requests[i].params.temperature == 0]
    if not greedy:
        return
    ref_engine = engine_for(engine, max_batch_size=8, shared_prefix_min=0)
    again = [request(i, mix[i], n=1, logprobs=True, top_logprobs=max(2, requests[i].params.top_logprobs))
             for i in reversed(greedy)]
    ref = {r.id: r for r in ref_engine.generate_all(again)}
    assert ref_engine.stats.batch_failures == 0
    for i in greedy:
        assert ref[i].ok, ref[i].error_message
        for ids in [by_id[i].token_ids] + [c.token_ids for c in by_id[i].choices]:
            same_greedy(ids, ref[i].token_ids, ref[i].logprobs, engine.tokenizer)
