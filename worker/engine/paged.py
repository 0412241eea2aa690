"""Decode attention over a paged KV cache.

The cache is a pool of fixed-size blocks, `kv[layer] -> [2, blocks, Hkv, BLOCK, D]`; each row owns a
list of blocks (its block table) and holds only what it reserved, so a long line no longer sets
the width of every row. A decode step attends each row's query to its first `lens[b]` cached
tokens, wherever their blocks lie.

On CUDA a Triton kernel does it in place (flash-decoding: the row's blocks are split over
programs, each returns a partial output and its log-sum-exp, and the parts are merged exactly);
elsewhere, and as the reference the kernel is tested against, the rows' blocks are gathered into
a dense tensor first.
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU machines use the gather path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def merge(o: torch.Tensor, lse: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of attention parts over `dim`: o [..., P, ..., D] and lse [..., P, ...] -> one part.

    Each part is softmax-normalised over its own keys; weighting by exp(lse - max) renormalises
    them over the union (FlashInfer's merge_state, Hydragen). Empty parts carry lse = -inf.
    """
    m = lse.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)  # [..., P, ...]
    total = w.sum(dim=dim, keepdim=True)
    out = (o * w.unsqueeze(-1)).sum(dim=dim) / total.clamp_min(1e-30).squeeze(dim).unsqueeze(-1)
    return out, (m + torch.log(total)).squeeze(dim)


def attend_gather(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                  lens: torch.Tensor, scale: float, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: q [B, Hq, D], pools [blocks, Hkv, BLOCK, D], block_table [B, W], lens [B]
    -> out [B, Hq, D] and lse [B, Hq] (float32), attending to tokens [0, lens[b])."""
    B, Hq, D = q.shape
    Hkv, bs = k_pool.shape[1], k_pool.shape[2]
    pages = -(-max_len // bs)
    idx = block_table[:, :pages].long()  # [B, P]
    k = k_pool[idx].permute(0, 2, 1, 3, 4).reshape(B, Hkv, pages * bs, D)  # [B, Hkv, L, D]
    v = v_pool[idx].permute(0, 2, 1, 3, 4).reshape(B, Hkv, pages * bs, D)
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhld->bhgl", qf, k.float()) * scale  # [B, Hkv, G, L]
    valid = torch.arange(pages * bs, device=q.device)[None, :] < lens[:, None]  # [B, L]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G]
    out = torch.einsum("bhgl,bhld->bhgd", torch.exp(s - lse[..., None]), v.float())
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


if triton is not None:

    # SPLITS is a plain argument: one compiled kernel serves every row bucket's split count.
    @triton.jit(do_not_specialize=["SPLITS"])
    def _paged_decode_kernel(Q, K, V, BT, LENS, O, LSE, scale,
                             s_qb, s_qh, s_kblk, s_kh, s_kt, s_btb, s_ob, s_oh, s_os, s_lb, s_lh, SPLITS,
                             G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                             TILE: tl.constexpr, IEEE: tl.constexpr):
        # One program: row b, KV head h, split s of the row's tokens; G query heads share head h.
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        n = tl.load(LENS + b)
        per_split = tl.cdiv(tl.cdiv(n, TILE), SPLITS) * TILE
        start = s * per_split
        end = tl.minimum(start + per_split, n)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=g[:, None] < G, other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        t = tl.arange(0, TILE)
        for t0 in range(start, end, TILE):
            tok = t0 + t  # [TILE] positions
            valid = tok < end
            blk = tl.load(BT + b * s_btb + tok // BS, mask=valid, other=0)
            off = blk.to(tl.int64) * s_kblk + h * s_kh + (tok % BS) * s_kt
            k = tl.load(K + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # [TILE, D]
            v = tl.load(V + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [G_PAD, TILE]
            else:
                sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where(valid[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        safe_l = tl.where(l > 0, l, 1.0)
        out = acc / safe_l[:, None]
        lse = tl.where(l > 0, m + tl.log(safe_l), float("-inf"))
        gm = g < G
        tl.store(O + b * s_ob + (h * G + g)[:, None] * s_oh + s * s_os + d[None, :], out, mask=gm[:, None])
        tl.store(LSE + b * s_lb + (h * G + g) * s_lh + s, lse, mask=gm)


def splits_for(rows: int, kv_heads: int, sms: int = 132) -> int:
    """Enough programs to fill the GPU when rows are few; one split per row when they are many."""
    return max(1, min(16, math.ceil(2 * sms / max(1, rows * kv_heads))))


def attend_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                  lens: torch.Tensor, scale: float, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As attend_gather, on CUDA, without copying the cache. Static shapes: capturable in a graph."""
    B, Hq, D = q.shape
    Hkv, bs = k_pool.shape[1], k_pool.shape[2]
    G = Hq // Hkv
    o = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_pool, v_pool, block_table, lens, o, lse, scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_table.stride(0),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), splits,
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BS=bs, TILE=max(16, 64 // max(1, D // 64)),
        IEEE=ieee, num_warps=4)
    if splits == 1:
        return o[:, :, 0].to(q.dtype), lse[:, :, 0]
    out, total = merge(o, lse, dim=2)
    return out.to(q.dtype), total


def attend_prefixes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_of: torch.Tensor,
                    lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every row to the shared prefix it uses (Hydragen, arXiv 2402.05099).

    q [B, Hq, D]; k, v [P, Hkv, L, D]: P prefixes stored once; prefix_of [B]: the row's prefix, -1
    for none; lens [P]. For each prefix, all rows' queries meet its keys in one matrix product
    (the rows that do not use it are masked), instead of each row reading the prefix on its own.
    Returns out [B, Hq, D] (float32) and lse [B, Hq]: -inf, with a zero output, for rows with none.
    """
    B, Hq, D = q.shape
    P, Hkv, L, _ = k.shape
    G = Hq // Hkv
    qh = q.reshape(B, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, B * G, D)  # [Hkv, B*G, D]
    cols = torch.arange(L, device=q.device)
    out = torch.zeros(Hkv, B * G, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Hkv, B * G), float("-inf"), dtype=torch.float32, device=q.device)
    for p in range(P):
        s = torch.matmul(qh, k[p].transpose(1, 2)).float() * scale  # [Hkv, B*G, L]
        mine = (prefix_of == p).repeat_interleave(G)  # [B*G]
        s = s.masked_fill(~(mine[None, :, None] & (cols < lens[p])[None, None, :]), float("-inf"))
        m = torch.logsumexp(s, dim=-1)  # [Hkv, B*G]
        w = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[..., None])
        out = out + torch.matmul(w.to(v.dtype), v[p]).float()  # a row's other prefixes add zeros
        lse = torch.maximum(lse, m)
    out = out.reshape(Hkv, B, G, D).permute(1, 0, 2, 3).reshape(B, Hq, D)
    return out, lse.reshape(Hkv, B, G).permute(1, 0, 2).reshape(B, Hq)


def attend(q, k_pool, v_pool, block_table, lens, scale, max_len: int, splits: int = 1):
    """Decode attention for rows [B]: the kernel on CUDA, the gather reference elsewhere."""
    if q.is_cuda and triton is not None:
        return attend_triton(q, k_pool, v_pool, block_table, lens, scale, splits)
    return attend_gather(q, k_pool, v_pool, block_table, lens, scale, max_len)
