"""Shared prompt prefixes (issue 9) with the bundled model on the CPU: prefilled once, attended to once,
and the output equals generation without sharing."""

from __future__ import annotations

import dataclasses

from llmbatch.worker.engine import Request, SamplingParams
from llmbatch.worker.engine.engine import Engine

SYSTEM = ("You are a careful assistant that sorts customer messages into one of five categories: billing, "
          "shipping, returns, technical support, or other. Answer with the category name only, in lower case, "
          "and nothing else. Be consistent and do not explain your answer. ") * 2
OTHER = ("You translate English into French. Keep the tone of the original, keep names as they are, and answer "
         "with the translation only, without quotes or notes of any kind, however short the text is. ") * 2
# On the CPU, bitsandbytes' 4-bit matmuls give slightly different hidden states for the same positions
# in forwards of different lengths (transformers' own forward too: 0.03 at layer 15 of SmolLM2 between
# a 111- and a 120-token pass), so shared and unshared runs agree token for token only where the model
# has a clear choice. These questions have no near-tie ("Hello!" has one: 30.99 against 30.91).
QUESTIONS = ["My package never arrived.", "I was charged twice.", "The app crashes on start.",
             "Can I send it back?", "My card was declined.", "Where is my refund?"]


def variant(engine, **overrides) -> Engine:
    return Engine(dataclasses.replace(engine.config, **overrides),
                  loaded=(engine.model, engine.tokenizer, engine.device, engine.dtype))


def chat(i, system, question, n=6, **kw):
    return Request(id=i, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                   params=SamplingParams(max_tokens=n, **kw))


def shared_prefix(engine, requests) -> int:
    ids = [engine._prepare([r])[0][0].ids for r in requests]
    n = 0
    while all(len(x) > n and x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def test_lines_sharing_a_system_prompt_give_the_same_tokens_with_and_without_sharing(engine):
    requests = [chat(i, SYSTEM, q) for i, q in enumerate(QUESTIONS)] + [
        Request(id="plain", prompt="Tell me a joke", params=SamplingParams(max_tokens=6))]
    off = variant(engine, shared_prefix_min=0).generate_all(requests)
    on_engine = variant(engine)
    on = on_engine.generate_all(requests)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    common = shared_prefix(engine, requests[:-1])
    assert common > 64
    for r, q in zip(on, requests):
        assert r.usage.prompt_tokens == len(engine._prepare([q])[0][0].ids)  # the whole prompt still counts
        assert r.usage.cached_tokens == (common if q.id != "plain" else 0)
    # The prefix was computed once: prompt tokens prefilled = the prefix + each row's own part.
    own = sum(r.usage.prompt_tokens - r.usage.cached_tokens for r in on)
    assert on_engine.stats.prefill_tokens == common + own
    assert on_engine.stats.batch_failures == 0


def test_a_prefix_below_the_minimum_is_not_shared(engine):
    requests = [chat(i, SYSTEM, q) for i, q in enumerate(QUESTIONS[:3])]
    common = shared_prefix(engine, requests)
    res = variant(engine, shared_prefix_min=common + 1).generate_all(requests)
    assert [r.usage.cached_tokens for r in res] == [0, 0, 0]
    assert [r.usage.cached_tokens for r in variant(engine, shared_prefix_min=common).generate_all(requests)] == \
        [common] * 3


def test_two_prefixes_in_one_batch_and_a_prompt_equal_to_the_whole_prefix(engine):
    requests = [chat(i, SYSTEM if i % 2 else OTHER, q) for i, q in enumerate(QUESTIONS)]
    # A raw prompt that is exactly the shared part of the SYSTEM lines: it keeps its last token for itself.
    tok = engine.tokenizer
    system_ids = engine._prepare([requests[1]])[0][0].ids[:shared_prefix(engine, requests[1::2])]
    requests.append(Request(id="whole", prompt=tok.decode(system_ids), params=SamplingParams(max_tokens=5)))
    off = variant(engine, shared_prefix_min=0).generate_all(requests)
    on = variant(engine).generate_all(requests)
    assert [r.token_ids for r in on[:6]] == [r.token_ids for r in off[:6]]
    # The cut-off template gives a flat next-token distribution: split attention is exact in arithmetic
    # but not bitwise, so only its first tokens are held equal (a near-tie may flip later ones).
    assert on[6].token_ids[:3] == off[6].token_ids[:3]
    cached = {r.id: r.usage.cached_tokens for r in on}
    assert len({cached[i] for i in range(0, 6, 2)}) == 1 and len({cached[i] for i in range(1, 6, 2)}) == 1
    assert cached[0] > 64 and cached[1] > 64 and cached[0] != cached[1]  # two different prefixes
    whole = next(r for r in on if r.id == "whole")
    assert whole.ok and whole.usage.cached_tokens <= whole.usage.prompt_tokens - 1


def test_rows_that_finish_are_refilled_while_the_prefix_is_shared(engine):
    # Room for one stored prefix and about 12 blocks: a few rows at a time, so finished rows make room for
    # waiting ones.
    requests = [chat(i, SYSTEM, QUESTIONS[i % 6] + " " * (i // 6), n=2 + i % 5) for i in range(12)]
    e = variant(engine, max_batch_tokens=4 * 16 + 2 * 128)
    on = e.generate_all(requests)
    assert e.stats.prefills > 2  # admitted in several rounds
    off = variant(engine, shared_prefix_min=0).generate_all(requests)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert all(r.usage.cached_tokens > 64 for r in on)


def test_stopping_in_the_middle_of_a_shared_group_leaves_the_engine_sound(engine):
    """A worker stops reading (a cancel) after the first results: the next call runs cleanly."""
    e = variant(engine, flush_seconds=0.0)
    requests = [chat(i, SYSTEM, q, n=2 + 6 * (i % 2)) for i, q in enumerate(QUESTIONS)]
    stream = e.generate(requests)
    first = next(stream)
    assert 0 < len(first) < len(requests)
    stream.close()  # the rest of the group is dropped, as run_chunk does on a cancel
    again = e.generate_all(requests)
    off = variant(engine, shared_prefix_min=0).generate_all(requests)
    assert [r.token_ids for r in again] == [r.token_ids for r in off]
    assert e.runner.prefixes_live <= 1 and len(e.runner.free_blocks) == e.runner.blocks  # nothing leaked


def test_cached_tokens_are_stored_counted_and_exported(engine, db, settings, tmp_path):
    import io
    import json

    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from llmbatch.jobs import export, service
    from llmbatch.jobs.models import Job
    from llmbatch.worker.runner import run_chunk
    from tests.support import write_jsonl

    lines = [{"custom_id": f"q{i}", "messages": [{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": q}], "max_tokens": 3}
             for i, q in enumerate(QUESTIONS[:4])]
    lines.append({"custom_id": "alone", "prompt": "Hi there", "max_tokens": 3})
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, dataclasses.replace(settings, chunk_size=8))
    assert run_chunk(db, variant(engine), out.chunk_ids[0], "w", 30).done == 5
    with db.read() as s:
        job = s.get(Job, out.job.id)
        summary = service.job_summary(job)
        buf, oai = io.StringIO(), io.StringIO()
        export.export(s, job, buf, "jsonl")
        export.export(s, job, oai, "openai")
    rows = {r["custom_id"]: r for r in map(json.loads, buf.getvalue().splitlines())}
    cached = rows["q0"]["cached_tokens"]
    assert cached > 64 and all(rows[f"q{i}"]["cached_tokens"] == cached for i in range(4))
    assert "cached_tokens" not in rows["alone"]  # nothing shared
    assert summary["cached_tokens"] == 4 * cached
    for line in map(json.loads, oai.getvalue().splitlines()):
        if line["custom_id"] == "alone":  # a raw prompt: the completions shape
            assert Completion.model_validate(line["response"]["body"]).usage.prompt_tokens_details.cached_tokens == 0
        else:
            body = ChatCompletion.model_validate(line["response"]["body"])
            assert body.usage.prompt_tokens_details.cached_tokens == cached


def test_a_line_dropped_as_too_long_frees_its_prefix_slot(engine):
    # One prefix slot, three rows and a pool of about 900 tokens: the SYSTEM group's long line can never
    # run. Once it is dropped, the slot must go to the OTHER group when the SYSTEM rows are done (they
    # finish together, so the OTHER rows wait for the slot rather than run alone).
    e = variant(engine, prefix_slots=1, max_batch_tokens=1024, max_batch_size=3)
    requests = [chat(i, SYSTEM, q, n=4, ignore_eos=True) for i, q in enumerate(QUESTIONS[:3])]
    requests.append(chat("long", SYSTEM, QUESTIONS[3], n=1000))
    requests += [chat(10 + i, OTHER, q, n=3) for i, q in enumerate(QUESTIONS[:3])]
    res = {r.id: r for r in e.generate_all(requests)}
    assert res["long"].error_code == "context_length_exceeded"
    assert all(res[i].usage.cached_tokens > 64 for i in (0, 1, 2, 10, 11, 12)), \
        {k: r.usage.cached_tokens for k, r in res.items()}
    assert e.stats.batch_failures == 0 and e.runner.prefixes_live == 0
