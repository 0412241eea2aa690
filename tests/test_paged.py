"""Paged decode attention: the Triton kernel (run by Triton's interpreter on the CPU) against the
gather reference, and the exact merge of attention parts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmbatch.worker.engine import paged

KERNEL_CHECK = r"""
import torch
from llmbatch.worker.engine import paged
torch.manual_seed(0)
B, Hkv, G, D, BS, blocks = 6, 2, 3, 64, 16, 60
k_pool = torch.randn(blocks, Hkv, BS, D)
v_pool = torch.randn(blocks, Hkv, BS, D)
table = torch.randperm(blocks)[: B * 10].reshape(B, 10).int()
lens = torch.tensor([1, 15, 16, 17, 100, 160])  # within a block, on and across block edges, full rows
q = torch.randn(B, Hkv * G, D)
ref_o, ref_l = paged.attend_gather(q, k_pool, v_pool, table, lens, 0.125, int(lens.max()))
for splits in (1, 3, 8):  # 8 splits: some programs get no tokens at all
    o, l = paged.attend_triton(q, k_pool, v_pool, table, lens, 0.125, splits)
    err = ((o - ref_o).norm() / ref_o.norm()).item()
    assert err < 1e-5 and torch.allclose(l, ref_l, atol=1e-4), (splits, err, (l - ref_l).abs().max())
print("ok")
"""


def test_kernel_matches_the_gather_reference():
    pytest.importorskip("triton", reason="the dev extras install triton; the kernel is checked under its interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


PREFIX_KERNEL_CHECK = r"""
import torch
from llmbatch.worker.engine import paged
torch.manual_seed(0)
for G in (3, 4):  # SmolLM2's 9 query heads over 3 KV heads; Llama's 4 per KV head
    B, Hkv, D, P, L = 60, 2, 64, 3, 90
    k, v = torch.randn(P, Hkv, L, D), torch.randn(P, Hkv, L, D)
    plens = torch.tensor([90, 17, 64])  # prefix 1 ends inside a tile; the store is longer than it
    # Rows out of order, some with no prefix; prefix 0 has more rows than one program's tile.
    prefix_of = torch.tensor([0, -1, 2, 0, 1, 0] * 10)
    q = torch.randn(B, Hkv * G, D)
    ref_o, ref_l = paged.attend_prefixes(q, k, v, prefix_of, plens, 0.125)
    order, starts = paged.prefix_rows(prefix_of, P)
    assert starts.tolist() == [10, 40, 50, 60], starts
    for splits in (1, 4):
        o, l = paged.attend_prefixes_triton(q, k, v, order, starts, plens, 0.125, splits)
        o, l = paged.merge(o, l, dim=2)
        none = prefix_of < 0
        assert torch.isinf(l[none]).all() and (o[none] == 0).all()
        err = ((o - ref_o).norm() / ref_o.norm()).item()
        assert err < 1e-5 and torch.allclose(l[~none], ref_l[~none], atol=1e-4), (G, splits, err)
print("ok")
"""


def test_prefix_kernel_matches_the_reference():
    pytest.importorskip("triton", reason="the dev extras install triton; the kernel is checked under its interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", PREFIX_KERNEL_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_shared_attention_equals_attention_over_prefix_then_own_tokens():
    torch.manual_seed(3)
    blocks, Hkv, BS, D, P, L = 12, 2, 4, 8, 2, 10
    k_pool, v_pool = torch.randn(blocks, Hkv, BS, D), torch.randn(blocks, Hkv, BS, D)
    pk, pv = torch.randn(P, Hkv, L, D), torch.randn(P, Hkv, L, D)
    plens = torch.tensor([10, 6])
    table = torch.tensor([[5, 2, 7], [0, 3, 1], [4, 6, 8]], dtype=torch.int32)
    lens = torch.tensor([9, 3, 5])
    prefix_of = torch.tensor([1, -1, 0])
    q = torch.randn(3, 4, D)
    o = paged.attend_shared(q, k_pool, v_pool, table, lens, 0.5, 12, 1, pk, pv, prefix_of, plens)
    for b in range(3):
        k = torch.cat([k_pool[i] for i in table[b].tolist()], dim=1)[:, : lens[b]]
        v = torch.cat([v_pool[i] for i in table[b].tolist()], dim=1)[:, : lens[b]]
        p = int(prefix_of[b])
        if p >= 0:  # the prefix's tokens come first
            k = torch.cat([pk[p, :, : plens[p]], k], dim=1)
            v = torch.cat([pv[p, :, : plens[p]], v], dim=1)
        for h in range(4):
            s = q[b, h] @ k[h // 2].T * 0.5
            assert torch.allclose(o[b, h], torch.softmax(s, -1) @ v[h // 2], atol=1e-5)


def test_gather_reference_is_attention_over_each_rows_own_tokens():
    torch.manual_seed(1)
    blocks, Hkv, BS, D = 8, 2, 4, 8
    k_pool, v_pool = torch.randn(blocks, Hkv, BS, D), torch.randn(blocks, Hkv, BS, D)
    table = torch.tensor([[5, 2, 7], [0, 3, 1]], dtype=torch.int32)
    lens = torch.tensor([9, 3])
    q = torch.randn(2, 4, D)  # two query heads per KV head
    o, lse = paged.attend_gather(q, k_pool, v_pool, table, lens, 0.5, 12)
    for b in range(2):
        k = torch.cat([k_pool[i] for i in table[b].tolist()], dim=1)[:, : lens[b]]  # [Hkv, n, D]
        v = torch.cat([v_pool[i] for i in table[b].tolist()], dim=1)[:, : lens[b]]
        for h in range(4):
            s = q[b, h] @ k[h // 2].T * 0.5
            assert torch.allclose(o[b, h], torch.softmax(s, -1) @ v[h // 2], atol=1e-5)
            assert torch.allclose(lse[b, h], torch.logsumexp(s, -1), atol=1e-5)


def test_merge_of_parts_equals_attention_over_their_union():
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 8), torch.randn(20, 8), torch.randn(20, 8)
    parts = [(0, 7), (7, 7), (7, 20)]  # the middle part is empty
    os_, ls_ = [], []
    for a, b in parts:
        s = q @ k[a:b].T
        ls_.append(torch.logsumexp(s, -1) if b > a else torch.full((3,), float("-inf")))
        os_.append(torch.softmax(s, -1) @ v[a:b] if b > a else torch.zeros(3, 8))
    o, lse = paged.merge(torch.stack(os_, 1), torch.stack(ls_, 1), dim=1)
    s = q @ k.T
    assert torch.allclose(o, torch.softmax(s, -1) @ v, atol=1e-5)
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)
