"""The generation engine on the CPU with the bundled SmolLM2-135M in NF4 (the `engine` fixture)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llmbatch.worker.engine import Request, SamplingParams
from llmbatch.worker.engine.engine import Engine
from llmbatch.worker.engine.forward import Runner

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write one sentence about the sea, the sky and the ships that sail between them at night:",
    "1, 2, 3, 4, 5,",
    "A recipe for bread needs flour, water, salt and",
]


def variant(engine, **overrides) -> Engine:
    """Another engine over the same loaded model, with other settings."""
    config = dataclasses.replace(engine.config, **overrides)
    return Engine(config, loaded=(engine.model, engine.tokenizer, engine.device, engine.dtype))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_mixed_lengths_in_one_batch_equal_each_alone(engine):
    e = variant(engine)  # fresh counters
    together = e.generate_all([Request(id=i, prompt=p, params=greedy(8)) for i, p in enumerate(PROMPTS)])
    # One prefill chunk for the five prompts, each prompt token computed once.
    assert e.stats.prefills == 1
    assert e.stats.prefill_tokens == sum(r.usage.prompt_tokens for r in together)
    for i, p in enumerate(PROMPTS):
        alone = engine.generate_all([Request(id=0, prompt=p, params=greedy(8))])[0]
        assert together[i].token_ids[:8] == alone.token_ids[:8], p


def test_matches_transformers_generate(engine):
    tok = engine.tokenizer
    res = engine.generate_all([Request(id=i, prompt=p, params=greedy(8)) for i, p in enumerate(PROMPTS[:3])])
    for p, r in zip(PROMPTS, res):
        enc = tok(p, return_tensors="pt")
        ref = engine.model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        ref = ref[0, enc["input_ids"].shape[1]:].tolist()
        assert r.token_ids[:len(ref)] == ref


def test_usage_and_length(engine):
    r = engine.generate_all([Request(id="a", prompt=PROMPTS[1], params=greedy(5, ignore_eos=True))])[0]
    assert r.ok and r.finish_reason == "length"
    assert r.usage.completion_tokens == len(r.token_ids) == 5
    assert r.usage.prompt_tokens == len(engine.tokenizer(PROMPTS[1])["input_ids"])  # no padding counted


def test_stop_string(engine):
    free = engine.generate_all([Request(id=0, prompt=PROMPTS[3], params=greedy(12, ignore_eos=True))])[0]
    words = free.output.split()
    assert len(words) >= 3, free.output
    stop = words[1]
    r = engine.generate_all([Request(id=0, prompt=PROMPTS[3], params=greedy(12, stop=(stop,)))])[0]
    assert r.finish_reason == "stop"
    assert r.output == free.output[:free.output.find(stop)] and stop not in r.output
    assert r.usage.completion_tokens < free.usage.completion_tokens


def test_stop_string_spanning_tokens_cuts_at_its_first_match(engine):
    tok = engine.tokenizer
    free = engine.generate_all([Request(id=0, prompt=PROMPTS[2], params=greedy(16, ignore_eos=True))])[0]
    pieces = [tok.decode(free.token_ids[:n], skip_special_tokens=True) for n in range(len(free.token_ids) + 1)]
    # A stop string made of the end of one token and the start of the next: it spans a boundary.
    n = next(n for n in range(2, len(pieces) - 1) if len(pieces[n]) - len(pieces[n - 1]) >= 2
             and len(pieces[n + 1]) - len(pieces[n]) >= 2)
    stop = pieces[n][-2:] + pieces[n + 1][len(pieces[n]):len(pieces[n]) + 2]
    first = free.output.find(stop)
    r = engine.generate_all([Request(id=0, prompt=PROMPTS[2], params=greedy(16, stop=("zzqx-never", stop)))])[0]
    assert r.finish_reason == "stop"
    assert r.output == free.output[:first]
    # It stopped at the token that completed the match, not later.
    done_at = next(k for k in range(len(pieces)) if stop in pieces[k])
    assert r.usage.completion_tokens == done_at


def test_a_long_line_does_not_narrow_the_batch(engine):
    # A cache of 2,048 tokens (128 blocks): twenty short rows need 1-2 blocks each; one line, with a prompt
    # of about 1,300 tokens, 82 blocks.
    e = variant(engine, max_batch_tokens=2048)
    short = [Request(id=i, prompt=PROMPTS[i % 5], params=greedy(12, ignore_eos=True)) for i in range(20)]
    long = Request(id="long", prompt=" ".join(["word"] * 1300), params=greedy(12, ignore_eos=True))
    peak = 0
    real_decode = e.runner.decode

    def decode(B, max_pos):
        nonlocal peak
        peak = max(peak, B)
        return real_decode(B, max_pos)

    e.runner.decode = decode
    res = e.generate_all(short + [long])
    assert all(r.ok for r in res), [r.error_message for r in res]
    # With a dense cache as wide as the longest line, 2048 // 1312 = 1 row would decode at a time.
    assert peak == 21


def test_a_line_bigger_than_the_whole_cache_fails_alone(engine):
    e = variant(engine, max_batch_tokens=256)
    res = e.generate_all([Request(id="big", prompt=PROMPTS[2], params=greedy(400)),
                          Request(id="ok", prompt=PROMPTS[1], params=greedy(3))])
    assert res[0].error_code == "context_length_exceeded" and "KV cache" in res[0].error_message
    assert res[1].ok


def test_seeded_rows_repeat(engine):
    # A draw depends only on the row's logits, seed and position, whatever the batch (test_sampling.py).
    # End to end, other batch mates change the batch's shape, and batched 4-bit matmuls then round the
    # logits differently in the last bits (about 2e-5 here): a draw within that of a boundary may flip,
    # as it may on GPUs (README, `seed`). What must hold exactly is a repeat of the same batch.
    def run(mates: int):
        reqs = [Request(id="s", prompt=PROMPTS[2], params=SamplingParams(max_tokens=10, temperature=1.0, seed=7))]
        reqs += [Request(id=i, prompt=PROMPTS[i % 5], params=SamplingParams(max_tokens=6, temperature=0.9, seed=i))
                 for i in range(mates)]
        return next(r for r in engine.generate_all(reqs) if r.id == "s").token_ids

    assert run(0) == run(0)
    assert run(3) == run(3)
    other = engine.generate_all([Request(id=0, prompt=PROMPTS[2],
                                         params=SamplingParams(max_tokens=10, temperature=1.0, seed=8))])[0]
    assert other.token_ids != run(0)


def test_oom_hook_halves_until_it_fits_then_grows_back(engine):
    e = variant(engine, oom_above_batch=2, max_batch_size=16)
    res = e.generate_all([Request(id=i, prompt=p, params=greedy(4)) for i, p in enumerate(PROMPTS)])
    assert all(r.ok for r in res), [r.error_message for r in res]
    assert e.max_batch_size == 4  # halved to 2 to fit, then one step back up after the batch succeeded
    e.config.oom_above_batch = None  # memory is there again
    sizes = []
    for _ in range(3):
        e.generate_all([Request(id=i, prompt=p, params=greedy(2)) for i, p in enumerate(PROMPTS)])
        sizes.append(e.max_batch_size)
    assert sizes == [8, 16, 16]  # back to the configured size, step by step, and no further


def test_single_item_oom_fails_alone(engine, monkeypatch):
    poison = engine.tokenizer(PROMPTS[2])["input_ids"]
    real_prefill = Runner.prefill

    def prefill(self, first_slot, ids, lengths, *shared):
        if any(row[:len(poison)] == poison for row in ids.tolist()):
            raise torch.OutOfMemoryError("pretend this prompt needs more memory than the device has")
        return real_prefill(self, first_slot, ids, lengths, *shared)

    monkeypatch.setattr(Runner, "prefill", prefill)
    e = variant(engine)
    res = e.generate_all([Request(id=i, prompt=p, params=greedy(4)) for i, p in enumerate(PROMPTS)])
    assert res[2].error_code == "out_of_memory" and res[2].finish_reason is None
    assert all(r.ok and r.usage.completion_tokens == 4 or r.finish_reason == "stop" for i, r in enumerate(res) if i != 2)


def test_context_length_exceeded(engine):
    long = " ".join(["word"] * (engine.context_length + 10))
    res = engine.generate_all([Request(id="long", prompt=long), Request(id="ok", prompt="Hi", params=greedy(3))])
    assert res[0].error_code == "context_length_exceeded"
    assert res[1].ok


def test_every_request_gets_one_result_across_refills(engine):
    # Fewer slots than requests: finished rows are replaced by waiting prompts (continuous batching).
    e = variant(engine, max_batch_tokens=64)  # 4 blocks: two or three rows at a time
    reqs = [Request(id=i, prompt=PROMPTS[i % 5], params=greedy(2 + i % 7)) for i in range(12)]
    batches = list(e.generate(reqs))
    ids = [r.id for b in batches for r in b]
    assert sorted(ids) == list(range(12))
    assert e.stats.prefills > 1
    alone = engine.generate_all([Request(id=0, prompt=PROMPTS[3], params=greedy(10))])[0]
    assert next(r for b in batches for r in b if r.id == 8).token_ids == alone.token_ids[:len(
        next(r for b in batches for r in b if r.id == 8).token_ids)]


def test_padded_fallback_for_unknown_architectures(engine):
    e = variant(engine)
    e.runner = None  # as for a model the slot runner does not support
    res = e.generate_all([Request(id=i, prompt=p, params=greedy(6)) for i, p in enumerate(PROMPTS[:3])])
    ref = engine.generate_all([Request(id=i, prompt=p, params=greedy(6)) for i, p in enumerate(PROMPTS[:3])])
    assert [r.token_ids for r in res] == [r.token_ids for r in ref]


def test_poison_in_tokenization_fails_alone(engine):
    """A chat template that raises on one item's messages fails that item only."""
    requests = [Request(id=i, prompt=p, params=greedy(4)) for i, p in enumerate(PROMPTS)]
    requests.append(Request(id="poison", messages=[{"role": "user", "content": None}], params=greedy(4)))
    res = engine.generate_all(requests)
    assert res[-1].error_code == "invalid_request" and "chat template" in res[-1].error_message
    assert all(r.ok and r.usage.completion_tokens > 0 for r in res[:-1])


def test_poison_in_generation_fails_alone(engine, monkeypatch):
    """An item whose forward pass raises fails alone with engine_error; its batch-mates succeed."""
    poison = engine.tokenizer(PROMPTS[3])["input_ids"]
    real_prefill = Runner.prefill

    def prefill(self, first_slot, ids, lengths, *shared):
        if any(row[:len(poison)] == poison for row in ids.tolist()):
            raise RuntimeError("poisoned prompt")
        return real_prefill(self, first_slot, ids, lengths, *shared)

    monkeypatch.setattr(Runner, "prefill", prefill)
    res = variant(engine).generate_all([Request(id=i, prompt=p, params=greedy(4)) for i, p in enumerate(PROMPTS)])
    assert res[3].error_code == "engine_error" and "poisoned prompt" in res[3].error_message
    assert [r.ok for i, r in enumerate(res) if i != 3] == [True] * (len(PROMPTS) - 1)


def test_top_p_zero_keeps_the_most_likely_token(engine):
    params = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.0, seed=1)
    sampled = engine.generate_all([Request(id=0, prompt=PROMPTS[1], params=params)])[0]
    greedy_run = engine.generate_all([Request(id=0, prompt=PROMPTS[1], params=greedy(4))])[0]
    assert sampled.ok and sampled.token_ids == greedy_run.token_ids


def test_a_cut_in_the_middle_of_a_character_drops_it(engine):
    """max_tokens can end between the byte tokens of one character: no U+FFFD at the end."""
    from llmbatch.worker.engine.generate import RowOutput, decode_output

    ids = engine.tokenizer.encode("Hi 😀", add_special_tokens=False)
    assert engine.tokenizer.decode(ids[:-1]).endswith("\ufffd")  # the emoji takes more than one token
    cut = RowOutput(tokens=ids[:-1], finish_reason="length")
    assert decode_output(engine.tokenizer, cut, engine.eos_ids) == "Hi "
    whole = RowOutput(tokens=ids, finish_reason="length")
    assert decode_output(engine.tokenizer, whole, engine.eos_ids) == "Hi 😀"


def test_prompt_length_is_recorded_and_a_cut_max_tokens_is_said(engine):
    small = variant(engine)
    small.context_length = 24  # a small context, so short prompts reach it
    too_long = " ".join(["word"] * 40)
    fits = "one two three four five six seven eight nine ten"
    n_long = len(engine.tokenizer(too_long)["input_ids"])
    n_fits = len(engine.tokenizer(fits)["input_ids"])
    res = small.generate_all([Request(id=0, prompt=too_long, params=greedy(4)),
                              Request(id=1, prompt=fits, params=greedy(64, ignore_eos=True))])
    assert res[0].error_code == "context_length_exceeded" and res[0].usage.prompt_tokens == n_long > 24
    assert res[1].ok and res[1].usage.completion_tokens == 24 - n_fits and res[1].finish_reason == "length"
    assert res[1].warning == f"max_tokens 64 cut to {24 - n_fits}: the prompt is {n_fits} tokens of the model's context of 24"
    ok = small.generate_all([Request(id=2, prompt=fits, params=greedy(2))])[0]
    assert ok.ok and ok.warning is None


def test_the_converted_bundled_model_is_stored_in_16_bits(engine):
    """Half the float32 copy; the loader quantizes it to NF4 anyway."""
    from safetensors import safe_open

    from llmbatch.worker.engine.loading import resolve_checkpoint

    checkpoint = Path(resolve_checkpoint(engine.config))
    files = list(checkpoint.glob("*.safetensors"))
    assert files and checkpoint.name.endswith("-f16")
    with safe_open(str(files[0]), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F16"}
    assert sum(p.stat().st_size for p in files) < 300 * 1024**2


# -- issue 19: valid input never takes the failure path ------------------------------------------------


def test_a_penalty_row_among_rows_that_move_fails_no_batch(engine):
    # Four rows at a time, finishing at different steps: rows move down into freed slots after the
    # penalty row was admitted (its counts move too), and waiting lines refill the slots.
    e = variant(engine, max_batch_size=4)
    reqs = [Request(id=i, prompt=PROMPTS[i % 5], params=greedy(2 + (5 * i) % 9, ignore_eos=True))
            for i in range(10)]
    reqs[1] = Request(id=1, prompt=PROMPTS[1], params=greedy(9, frequency_penalty=0.5, presence_penalty=0.3,
                                                               repetition_penalty=1.2, ignore_eos=True))
    res = e.generate_all(reqs)
    assert all(r.ok for r in res), [r.error_message for r in res]
    assert e.stats.batch_failures == 0
    alone = variant(engine).generate_all([reqs[1]])[0]
    assert res[1].token_ids == alone.token_ids


def test_a_seed_from_2_63_up_samples_as_its_64_bits(engine):
    e = variant(engine)

    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
        return e.generate_all([Request(id=0, prompt=PROMPTS[2], params=params)])[0].token_ids

    assert run(2**64 - 1) == run(-1) and run(2**63) == run(-(2**63))
    assert e.stats.batch_failures == 0


def test_n_above_the_rows_a_worker_holds_is_its_own_error(engine):
    e = variant(engine, max_batch_size=4)
    res = e.generate_all([Request(id="wide", prompt=PROMPTS[1], params=SamplingParams(max_tokens=3, n=5)),
                          Request(id="ok", prompt=PROMPTS[1], params=SamplingParams(max_tokens=3, n=4))])
    assert res[0].error_code == "too_many_choices"
    assert "n=5" in res[0].error_message and "LLMBATCH_MAX_BATCH_SIZE" in res[0].error_message
    assert res[1].ok and len(res[1].choices) == 3
    assert e.stats.batch_failures == 0
    # After an out-of-memory back-off the same line may fit again later: out_of_memory, which retry retries.
    e = variant(engine, max_batch_size=4, oom_above_batch=2)
    res = e.generate_all([Request(id=i, prompt=PROMPTS[1], params=SamplingParams(max_tokens=2, n=1 + 2 * (i == 0)))
                          for i in range(4)])
    assert res[0].error_code == "out_of_memory" and "n=3" in res[0].error_message
    assert all(r.ok for r in res[1:])


def test_a_feed_that_raises_stops_feeding_and_the_items_in_flight_run_on(engine):
    e = variant(engine, max_batch_size=4)
    calls = []

    def more():
        calls.append(1)
        if len(calls) == 1:
            return [Request(id=f"fed{i}", prompt=PROMPTS[i], params=greedy(4)) for i in range(3)]
        raise ConnectionError("the database went away while claiming the next chunk")

    first = [Request(id=i, prompt=PROMPTS[i], params=greedy(6)) for i in range(5)]
    res = [r for batch in e.generate(first, more=more) for r in batch]
    assert sorted(map(str, (r.id for r in res))) == sorted(["0", "1", "2", "3", "4", "fed0", "fed1", "fed2"])
    assert all(r.ok for r in res), [r.error_message for r in res]
    assert len(calls) == 2  # not asked again after it raised
    assert e.stats.batch_failures == 0 and e.stats.feed_errors == 1


def test_cancelled_rows_leave_the_batch_at_the_next_step_and_free_their_blocks(engine):
    """The `cancelled` hook: a live row and a waiting one are dropped mid-run; the other item
    runs on unchanged, and every block comes back."""
    e = variant(engine, max_batch_size=1, flush_seconds=60.0)  # one row at a time: b and c wait behind a
    reqs = [Request(id="a", prompt="1, 2, 3, 4, 5,", params=greedy(200)),
            Request(id="b", prompt="The capital of France is", params=greedy(4)),
            Request(id="c", prompt="1, 2, 3, 4, 5,", params=greedy(200))]
    yields = list(e.generate(reqs, cancelled=lambda: {"a", "c"} if e.stats.steps >= 5 else set()))
    # Dropped at step 5 and yielded at once (flush_seconds is 60 s), before b has even started.
    assert sorted((r.id, r.finish_reason) for r in yields[0]) == [("a", "cancelled"), ("c", "cancelled")]
    results = {r.id: r for batch in yields for r in batch}
    assert len(results) == 3 and sum(len(batch) for batch in yields) == 3  # one result each
    a, b, c = results["a"], results["b"], results["c"]
    assert a.error_code == "cancelled" and 4 <= a.usage.completion_tokens <= 7
    assert c.error_code == "cancelled" and c.usage.completion_tokens == 0
    alone = engine.generate_all([Request(id="b", prompt="The capital of France is", params=greedy(4))])[0]
    assert b.ok and b.output == alone.output and b.usage.completion_tokens == alone.usage.completion_tokens
    assert len(e.runner.free_blocks) == e.runner.blocks  # the dropped rows' blocks were freed
    assert e.stats.steps < 20  # nobody decoded a's or c's 200 tokens


def test_requests_cancelled_before_they_start_are_never_prefilled(engine):
    e = variant(engine)
    out = [r for batch in e.generate([Request(id=1, prompt="Hi", params=greedy(3)),
                                      Request(id=2, prompt="Hi", params=greedy(3))], cancelled=lambda: {2})
           for r in batch]
    by_id = {r.id: r for r in out}
    assert len(out) == 2 and by_id[2].finish_reason == "cancelled" and by_id[1].ok
    assert e.stats.prefill_tokens == by_id[1].usage.prompt_tokens


# -- issue 18: a decode loop that never waits -----------------------------------------------------


def test_the_host_never_waits_for_the_step_it_just_launched(engine):
    """Greedy, sampled, and one logprobs row (plus one grammar row, whose mask needs the token of the
    step before: it reads that step while the next one is queued) among rows that finish at different
    times and refill the slots: no read of the step just launched (Stats.host_waits, host.py)."""
    lengths = [3 + (5 * i) % 7 for i in range(10)]
    runs = {
        "greedy": [greedy(n, ignore_eos=True) for n in lengths],
        "sampled": [SamplingParams(max_tokens=n, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
                    for i, n in enumerate(lengths)],
        "logprobs": [greedy(n, ignore_eos=True, logprobs=i == 3, top_logprobs=2 * (i == 3)) for i, n in enumerate(lengths)],
        "json": [greedy(n, ignore_eos=True, response_format="json_object" if i == 5 else "text")
                 for i, n in enumerate(lengths)],
    }
    out = {}
    for name, params in runs.items():
        e = variant(engine, max_batch_size=4)
        out[name] = e.generate_all([Request(id=i, prompt=PROMPTS[i % 5], params=p) for i, p in enumerate(params)])
        assert all(r.ok for r in out[name]), (name, [r.error_message for r in out[name]])
        assert e.stats.steps > 10 and e.stats.prefills > 1  # rows came and went
        assert e.stats.host_waits == 0, name
    lp = out["logprobs"][3]
    assert len(lp.logprobs) == len(lp.token_ids) == lengths[3]
    alone = variant(engine).generate_all([Request(id=0, prompt=PROMPTS[3], params=runs["logprobs"][3])])[0]
    assert lp.token_ids == alone.token_ids
    for a, b in zip(lp.logprobs, alone.logprobs):  # each token's entry is the one computed at its step
        assert a["token"] == b["token"] and abs(a["logprob"] - b["logprob"]) < 1e-3
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]


def test_a_read_of_the_step_just_launched_is_counted(engine, monkeypatch):
    """The counter can fail: a loop that reads every launch's results before queuing the next waits on
    every decode step and every prefill chunk."""
    from llmbatch.worker.engine.host import Readback

    copy = Readback.copy

    def eager(self, step, tensors):
        c = copy(self, step, tensors)
        self.read(c)
        return c

    monkeypatch.setattr(Readback, "copy", eager)
    e = variant(engine, max_batch_size=4)
    res = e.generate_all([Request(id=i, prompt=PROMPTS[i % 5], params=greedy(2 + i, ignore_eos=True))
                          for i in range(6)])
    assert all(r.ok for r in res)
    assert e.stats.host_waits == e.stats.steps + e.stats.prefills > 0


def test_a_penalty_row_among_rows_that_finish_at_different_times_uses_memory_only_for_itself(engine, monkeypatch):
    """Penalty tables are reserved for penalty_rows rows with the cache, not for every slot; each step
    penalizes only the rows that have penalties ([R, V], not [B, V]); a second penalty row waits for the
    table; outputs equal each line run alone."""
    from llmbatch.worker.engine import logits as L

    shapes = []
    apply = L.apply_penalties

    def spy(logits, *rest):
        shapes.append(tuple(logits.shape))
        apply(logits, *rest)

    monkeypatch.setattr(L, "apply_penalties", spy)
    e = variant(engine, max_batch_size=4, penalty_rows=1)
    pen = dict(frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2, ignore_eos=True)
    reqs = [Request(id=i, prompt=PROMPTS[i % 5], params=greedy(2 + (5 * i) % 9, ignore_eos=True)) for i in range(8)]
    reqs[1] = Request(id=1, prompt=PROMPTS[1], params=greedy(9, **pen))
    reqs[2] = Request(id=2, prompt=PROMPTS[2], params=greedy(5, **pen))
    res = e.generate_all(reqs)
    assert all(r.ok for r in res), [r.error_message for r in res]
    V = e.runner.dims.vocab
    assert e.runner.slots >= 4
    assert tuple(e.runner.penalty_counts.shape) == (1, V) and tuple(e.runner.penalty_seen.shape) == (1, V)
    assert set(shapes) == {(1, V)}  # one penalty row at a time, among up to four
    # Every token of both penalty rows, each penalized alone, and the one step each computes in flight
    # after its last token (scheduler.py), before it leaves with its table.
    assert len(shapes) == (9 + 1) + (5 + 1)
    for i in (1, 2, 0, 4):
        alone = variant(engine).generate_all([reqs[i]])[0]
        assert res[i].token_ids == alone.token_ids, i
