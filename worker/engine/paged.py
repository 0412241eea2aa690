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
                  lens: torch.Tensor, scale: float, splits: int,
                  merged: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """As attend_gather, on CUDA, without copying the cache. Static shapes: capturable in a graph.
    merged=False returns the splits' parts, o [B, Hq, splits, D] and lse [B, Hq, splits], float32."""
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
    if not merged:
        return o, lse
    if splits == 1:
        return o[:, :, 0].to(q.dtype), lse[:, :, 0]
    out, total = merge(o, lse, dim=2)
    return out.to(q.dtype), total


def attend_prefixes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_of: torch.Tensor,
                    lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: attention of every row to the shared prefix it uses (Hydragen, arXiv 2402.05099).

    q [B, Hq, D]; k, v [P, Hkv, L, D]: P prefixes stored once; prefix_of [B]: the row's prefix, -1
    for none; lens [P]. For each prefix, all rows' queries meet its keys in one matrix product
    (the rows that do not use it are masked). Returns out [B, Hq, D] (float32) and lse [B, Hq]:
    -inf, with a zero output, for rows with none. CPUs and tests; GPUs run _prefix_decode_kernel.
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


def prefix_rows(prefix_of: torch.Tensor, prefixes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by prefix, on the device (capturable): order [B], the rows sorted by prefix (rows
    with none, -1, first), and starts [P + 1]: prefix p's rows are order[starts[p]:starts[p + 1]]."""
    order = torch.argsort(prefix_of, stable=True)
    wanted = torch.arange(prefixes + 1, device=prefix_of.device, dtype=prefix_of.dtype)
    return order, torch.searchsorted(prefix_of[order].contiguous(), wanted)


def _prefix_tile(G: int) -> int:
    """Query vectors (rows x heads sharing a KV head) one program multiplies against a prefix tile."""
    return max(64, triton.next_power_of_2(G)) if triton is not None else 64


if triton is not None:

    @triton.jit(do_not_specialize=["TILES", "SPLITS"])
    def _prefix_decode_kernel(Q, K, V, ORDER, STARTS, PLENS, O, LSE, scale,
                              s_qb, s_qh, s_kp, s_kh, s_kt, s_ob, s_oh, s_os, s_lb, s_lh, TILES, SPLITS,
                              G: tl.constexpr, M: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr,
                              IEEE: tl.constexpr):
        # One program: prefix p, a tile of M // G of its rows (M query vectors: every head of those
        # rows that reads KV head h), split s of the prefix. The prefix tile is read once for all of
        # them: one [M, D] x [D, TILE] product instead of M // G rows reading it on their own.
        p = tl.program_id(0) // TILES
        per_tile = M // G
        r0 = tl.load(STARTS + p) + (tl.program_id(0) % TILES) * per_tile
        r_end = tl.load(STARTS + p + 1)
        h = tl.program_id(1)
        s = tl.program_id(2)
        m = tl.arange(0, M)
        r = r0 + m // G
        g = m % G
        live = (m < per_tile * G) & (r < r_end)
        row = tl.load(ORDER + r, mask=live, other=0).to(tl.int64)
        n = tl.where(r0 < r_end, tl.load(PLENS + p), 0)  # a tile past the prefix's rows does nothing
        per_split = tl.cdiv(tl.cdiv(n, TILE), SPLITS) * TILE
        start = s * per_split
        end = tl.minimum(start + per_split, n)
        d = tl.arange(0, D)
        q = tl.load(Q + (row * s_qb + (h * G + g) * s_qh)[:, None] + d[None, :], mask=live[:, None], other=0.0)
        mx = tl.full([M], float("-inf"), tl.float32)
        l = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        t = tl.arange(0, TILE)
        base = p.to(tl.int64) * s_kp + h * s_kh
        for t0 in range(start, end, TILE):
            tok = t0 + t
            valid = tok < end
            off = base + tok * s_kt
            k = tl.load(K + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # [TILE, D]
            v = tl.load(V + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [M, TILE]
            else:
                sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where(valid[None, :], sc, float("-inf"))
            m_new = tl.maximum(mx, tl.max(sc, 1))
            alpha = tl.exp(mx - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l = l * alpha + tl.sum(pr, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            mx = m_new
        safe_l = tl.where(l > 0, l, 1.0)
        out = acc / safe_l[:, None]
        lse = tl.where(l > 0, mx + tl.log(safe_l), float("-inf"))
        head = h * G + g
        tl.store(O + (row * s_ob + head * s_oh + s * s_os)[:, None] + d[None, :], out, mask=live[:, None])
        tl.store(LSE + row * s_lb + head * s_lh + s, lse, mask=live)


def prefix_splits(rows: int, q_heads: int, kv_heads: int, sms: int = 132) -> int:
    """Splits of the prefix per program, as splits_for, counting tiles of rows instead of rows."""
    tiles = -(-rows // (_prefix_tile(q_heads // kv_heads) // (q_heads // kv_heads)))
    return max(1, min(16, math.ceil(2 * sms / max(1, tiles * kv_heads))))


def attend_prefixes_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor,
                           starts: torch.Tensor, lens: torch.Tensor, scale: float,
                           splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As attend_prefixes on CUDA, over each prefix's live length and only its own rows (prefix_rows
    gives order and starts); returns the splits' parts, o [B, Hq, splits, D] and lse [B, Hq, splits]."""
    B, Hq, D = q.shape
    P, Hkv, _, _ = k.shape
    G = Hq // Hkv
    M = _prefix_tile(G)
    tiles = -(-B // (M // G))  # enough for every row to sit under one prefix
    o = torch.zeros(B, Hq, splits, D, dtype=torch.float32, device=q.device)  # rows with no prefix stay empty
    lse = torch.full((B, Hq, splits), float("-inf"), dtype=torch.float32, device=q.device)
    _prefix_decode_kernel[(P * tiles, Hkv, splits)](
        q, k, v, order, starts, lens, o, lse, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), tiles, splits,
        G=G, M=M, D=D, TILE=max(16, 64 // max(1, D // 64)), IEEE=q.dtype == torch.float32, num_warps=4)
    return o, lse


def attend_shared(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                  lens: torch.Tensor, scale: float, max_len: int, splits: int, prefix_k: torch.Tensor,
                  prefix_v: torch.Tensor, prefix_of: torch.Tensor, prefix_lens: torch.Tensor,
                  rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Decode attention for rows that may use a shared prefix: each row's own tokens (paged) and its
    prefix (stored once), merged exactly by log-sum-exp -> out [B, Hq, D] in q's dtype.
    rows: prefix_rows(prefix_of, P), computed once per step rather than once per layer."""
    if q.is_cuda and triton is not None:
        o1, l1 = attend_triton(q, k_pool, v_pool, block_table, lens, scale, splits, merged=False)
        order, starts = rows if rows is not None else prefix_rows(prefix_of, prefix_k.shape[0])
        B, Hq, _ = q.shape
        o2, l2 = attend_prefixes_triton(q, prefix_k, prefix_v, order, starts, prefix_lens, scale,
                                        prefix_splits(B, Hq, prefix_k.shape[1]))
        o, _ = merge(torch.cat([o1, o2], 2), torch.cat([l1, l2], 2), dim=2)
    else:
        o1, l1 = attend_gather(q, k_pool, v_pool, block_table, lens, scale, max_len)
        o2, l2 = attend_prefixes(q, prefix_k, prefix_v, prefix_of, prefix_lens, scale)
        o, _ = merge(torch.stack([o1.float(), o2], 2), torch.stack([l1, l2], 2), dim=2)
    return o.to(q.dtype)


def attend(q, k_pool, v_pool, block_table, lens, scale, max_len: int, splits: int = 1):
    """Decode attention for rows [B]: the kernel on CUDA, the gather reference elsewhere."""
    if q.is_cuda and triton is not None:
        return attend_triton(q, k_pool, v_pool, block_table, lens, scale, splits)
    return attend_gather(q, k_pool, v_pool, block_table, lens, scale, max_len)
