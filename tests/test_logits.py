"""Logits processing (worker/engine/logits.py) against transformers' processors and OpenAI's formulas."""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

from llmbatch.worker.engine import logits as L

V = 50


def _state(input_ids: torch.Tensor, prompt_len: int):
    """counts [B, V] of generated tokens and seen [B, V] of prompt + generated, as controls.Controls keeps them."""
    B = input_ids.shape[0]
    counts = torch.zeros(B, V, dtype=torch.int32)
    seen = torch.zeros(B, V, dtype=torch.bool)
    for b in range(B):
        for j, t in enumerate(input_ids[b].tolist()):
            seen[b, t] = True
            if j >= prompt_len:
                counts[b, t] += 1
    return counts, seen


def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, V, generator=g) * 4  # both signs
    ids = torch.randint(0, V, (3, 12), generator=g)
    counts, seen = _state(ids, prompt_len=5)
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
        got = scores.clone()
        zeros = torch.zeros(3)
        L.apply_penalties(got, counts, seen, zeros, zeros, torch.full((3,), penalty))
        torch.testing.assert_close(got, expected)


def test_frequency_and_presence_follow_openai_per_row():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, V, generator=g)
    ids = torch.randint(0, 8, (2, 20), generator=g)  # few distinct tokens: repeats
    counts, seen = _state(ids, prompt_len=6)
    freq, pres = torch.tensor([0.5, -1.0]), torch.tensor([1.5, 0.0])
    expected = scores.clone()
    for b in range(2):
        for t in range(V):
            c = ids[b, 6:].tolist().count(t)  # generated only: the prompt does not count for OpenAI's penalties
            expected[b, t] -= freq[b] * c + pres[b] * (c > 0)
    got = scores.clone()
    L.apply_penalties(got, counts, seen, freq, pres, torch.ones(2))
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, scores)


def test_logit_bias_matches_sequence_bias_for_single_tokens():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, V, generator=g)
    bias = {3: 5.0, 7: -100.0}
    expected = SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in bias.items()])(
        torch.zeros(2, 4, dtype=torch.long), scores.clone())
    got = scores.clone()
    rows = torch.tensor([0, 0, 1, 1])
    ids = torch.tensor([3, 7, 3, 7])
    L.apply_bias(got, rows, ids, torch.tensor([5.0, -100.0, 5.0, -100.0]))
    torch.testing.assert_close(got, expected)


def test_bitmask_matches_xgrammar_cpu_kernel():
    import xgrammar as xgr

    g = torch.Generator().manual_seed(3)
    vocab = 100  # not a multiple of 32: the last word is partly padding
    scores = torch.randn(3, vocab, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=g, dtype=torch.int64).to(torch.int32)
    expected = scores.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab)
    got = scores.clone()
    L.apply_bitmask(got, bitmask, torch.arange(3))
    assert torch.equal(got, expected)
    # Only the rows given are masked.
    partial = scores.clone()
    L.apply_bitmask(partial, bitmask[1:2], torch.tensor([1]))
    assert torch.equal(partial[0], scores[0]) and torch.equal(partial[1], expected[1])


def test_token_logprobs_are_log_softmax_and_sorted():
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(4, V, generator=g)
    chosen = torch.tensor([0, 5, 9, 49])
    mine, top, ids = L.token_logprobs(scores, chosen, 5)
    ref = torch.log_softmax(scores, dim=-1)
    torch.testing.assert_close(mine, ref[torch.arange(4), chosen])
    assert top.shape == ids.shape == (4, 5)
    assert torch.all(top[:, :-1] >= top[:, 1:])
    torch.testing.assert_close(top, ref.gather(1, ids))
    assert torch.equal(ids[:, 0], ref.argmax(-1))
