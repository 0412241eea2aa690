"""logprobs, n choices, logit_bias and penalties through the slot loop (worker/engine/controls.py)."""

from __future__ import annotations

import torch

from llmbatch.worker.engine import Request, SamplingParams

PROMPT = "The capital of France is"


def test_logprobs_match_a_reference_forward_pass(engine):
    params = SamplingParams(max_tokens=6, logprobs=True, top_logprobs=3, ignore_eos=True)
    r = engine.generate_all([Request(id=0, prompt=PROMPT, params=params)])[0]
    assert r.ok and len(r.logprobs) == len(r.token_ids) == 6
    ids = engine.tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids + r.token_ids], device=engine.device)).logits[0].float()
    ref = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)  # the distribution each token was drawn from
    for j, (entry, tok) in enumerate(zip(r.logprobs, r.token_ids)):
        assert entry["token"] == engine.tokenizer.decode([tok])
        assert abs(entry["logprob"] - ref[j, tok].item()) < 2e-3, j
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == entry["token"]  # greedy: the chosen token is the most likely
        want = ref[j].topk(3).values.tolist()
        assert all(abs(a["logprob"] - b) < 2e-3 for a, b in zip(tops, want))


def test_n_choices_differ_repeat_with_a_seed_and_share_one_prefill(engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=3, ignore_eos=True)
    first = engine.generate_all([Request(id=0, prompt=PROMPT, params=params)])[0]
    prompt_tokens = first.usage.prompt_tokens
    assert engine.stats.prefill_tokens > 0
    before = engine.stats.prefill_tokens
    again = engine.generate_all([Request(id=0, prompt=PROMPT, params=params)])[0]
    assert engine.stats.prefill_tokens - before == prompt_tokens  # once, not n times
    runs = [[first.token_ids] + [c.token_ids for c in first.choices],
            [again.token_ids] + [c.token_ids for c in again.choices]]
    assert len(runs[0]) == 3
    assert runs[0] == runs[1]  # the same seed gives the same three choices
    assert len({tuple(t) for t in runs[0]}) >= 2  # derived seeds: the choices differ
    assert first.usage.completion_tokens == 3 * 8
    assert [c.output for c in first.choices] == [engine.tokenizer.decode(t, skip_special_tokens=True)
                                                 for t in runs[0][1:]]
    # Choice 0 keeps the line's own seed: it is what n=1 with that seed gives.
    alone = engine.generate_all([Request(id=0, prompt=PROMPT, params=SamplingParams(
        max_tokens=8, temperature=1.0, seed=11, ignore_eos=True))])[0]
    assert alone.token_ids == first.token_ids


def test_n_rows_mix_with_plain_rows_in_one_batch(engine):
    plain = SamplingParams(max_tokens=5, ignore_eos=True)
    many = SamplingParams(max_tokens=5, n=2, ignore_eos=True)
    out = engine.generate_all([Request(id=0, prompt="Hi", params=plain), Request(id=1, prompt=PROMPT, params=many),
                               Request(id=2, prompt="1, 2, 3,", params=plain)])
    assert [len(r.choices) for r in out] == [0, 1, 0]
    assert out[1].choices[0].token_ids == out[1].token_ids  # greedy: both choices alike
    alone = engine.generate_all([Request(id=0, prompt=PROMPT, params=plain)])[0]
    assert out[1].token_ids == alone.token_ids


def test_logit_bias_and_penalties_steer_generation(engine):
    target = engine.tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    biased = SamplingParams(max_tokens=4, logit_bias=((target, 100.0),), ignore_eos=True)
    r = engine.generate_all([Request(id=0, prompt=PROMPT, params=biased)])[0]
    assert r.token_ids == [target] * 4
    # repetition_penalty 1e3 divides a seen token's positive logit to about nothing: no token twice,
    # and none of the prompt's. The biased row beside it keeps its own controls.
    penalised = SamplingParams(max_tokens=3, repetition_penalty=1e3, ignore_eos=True)
    rp = engine.generate_all([Request(id=0, prompt=PROMPT, params=penalised), Request(id=1, prompt=PROMPT, params=biased)])
    assert len(set(rp[0].token_ids)) == 3
    assert not set(rp[0].token_ids) & set(engine.tokenizer(PROMPT)["input_ids"])
    assert rp[1].token_ids == [target] * 4


def test_logprobs_leave_out_the_end_of_turn_token(engine):
    """issue 20: OpenAI's chat logprobs.content covers the message's tokens, not the end-of-turn token
    that stopped it; the output text leaves that token out, and so do the entries."""
    params = SamplingParams(max_tokens=24, logprobs=True, top_logprobs=2)
    ask = "What is 2+2? Answer with just the number."  # greedy SmolLM2 answers in a few tokens, then ends its turn
    r = engine.generate_all([Request(id=0, messages=[{"role": "user", "content": ask}], params=params)])[0]
    assert r.ok and r.finish_reason == "stop" and r.token_ids[-1] in engine.eos_ids  # it ended by end-of-turn
    assert len(r.logprobs) == len(r.token_ids) - 1
    end = engine.tokenizer.decode([r.token_ids[-1]])
    assert end not in [e["token"] for e in r.logprobs]
    assert "".join(e["token"] for e in r.logprobs).strip() == r.output.strip()
    assert r.usage.completion_tokens == len(r.token_ids)  # still counted, as OpenAI counts it
    # A row cut by max_tokens keeps an entry for every token.
    cut = engine.generate_all([Request(id=0, messages=[{"role": "user", "content": "Hi!"}],
                                       params=SamplingParams(max_tokens=4, logprobs=True))])[0]
    assert cut.finish_reason == "length" and len(cut.logprobs) == len(cut.token_ids) == 4
