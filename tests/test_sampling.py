"""The sampler (worker/engine/sampling.py): a row's draw depends only on its own logits, settings, seed and
position, never on the rows it is batched with."""

from __future__ import annotations

import torch

from llmbatch.worker.engine.sampling import RowSampling, SlotSampling, sample
from llmbatch.worker.engine.types import SamplingParams


def test_a_rows_draw_ignores_its_batch_mates():
    torch.manual_seed(0)
    V = 49152  # a real vocabulary's width: float32 sums over it round, which must not reach a plain row
    mine = SamplingParams(max_tokens=4, temperature=1.0, seed=7)
    mates = [SamplingParams(max_tokens=4, temperature=0.9, top_p=0.8),  # the sorted (top-p) path for the batch
             SamplingParams(max_tokens=4, temperature=0.0),
             SamplingParams(max_tokens=4, temperature=1.3, top_k=5, seed=3)]
    for trial in range(20):
        logits = torch.randn(V) * 4
        for pos in range(8):
            alone = sample(logits[None], RowSampling.build([mine], [7], torch.device("cpu")), torch.tensor([pos]))
            for k in range(1, len(mates) + 1):
                batch = torch.cat([torch.randn(k, V) * 4, logits[None]])
                s = RowSampling.build(mates[:k] + [mine], [11, 12, 13][:k] + [7], torch.device("cpu"))
                got = sample(batch, s, torch.tensor([3] * k + [pos]))
                assert got[-1] == alone[0], (trial, pos, k)


def test_draws_follow_the_seed_and_position():
    logits = torch.zeros(1, 1000)  # uniform: the draw is the random number itself
    s7 = RowSampling.build([SamplingParams(max_tokens=4, temperature=1.0, seed=7)], [7], torch.device("cpu"))
    s8 = RowSampling.build([SamplingParams(max_tokens=4, temperature=1.0, seed=8)], [8], torch.device("cpu"))
    draws7 = [int(sample(logits, s7, torch.tensor([p]))) for p in range(16)]
    assert draws7 == [int(sample(logits, s7, torch.tensor([p]))) for p in range(16)]
    assert draws7 != [int(sample(logits, s8, torch.tensor([p]))) for p in range(16)]
    assert len(set(draws7)) > 8  # positions give different draws


def test_slot_settings_written_by_index_sample_as_a_built_batch():
    torch.manual_seed(1)
    cpu = torch.device("cpu")
    params = [SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, seed=1),
              SamplingParams(max_tokens=4, temperature=0.0),
              SamplingParams(max_tokens=4, temperature=1.2, top_k=7, seed=2),
              SamplingParams(max_tokens=4, temperature=1.0, seed=3)]
    seeds = [1, 5, 2, 3]
    slots = SlotSampling(6, cpu)
    slots.admit(0, params[:2], seeds[:2])
    slots.admit(2, [params[3], params[2]], [seeds[3], seeds[2]])  # slot 2 then moves to slot 4
    slots.move(2, 4)
    slots.move(3, 2)
    slots.move(4, 3)  # slots [0, 4) now hold params in order
    logits = torch.randn(4, 500) * 3
    pos = torch.tensor([5, 6, 7, 8])
    want = sample(logits, RowSampling.build(params, seeds, cpu), pos)
    assert torch.equal(sample(logits, slots.rows(0, 4), pos), want)
    assert torch.equal(sample(logits[2:], slots.rows(2, 2), pos[2:]), want[2:])
