"""A Llama-family forward over the model's own modules, with a paged KV cache and CUDA graphs.

The cache is a pool of blocks of BLOCK tokens (paged.py). Each live row sits in a slot and owns
the blocks its block table lists, reserved for its prompt plus its max_tokens when it is
admitted, so a long line holds only what it may use and does not narrow everybody else. No
padding is stored: a decode step writes row b's new K/V at its own position and attends to its
first pos+1 tokens. A finished row is replaced by a new prompt (continuous batching); moving a
row between slots moves its block table, not its cache. For a given row bucket the decode step
has static shapes, so on CUDA it is captured once as a graph and replayed.

The linear layers are the model's own (bitsandbytes NF4), as are the norms and the rotary
embedding, so the numbers match the transformers forward; only attention and the cache are ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from . import invariant, paged
from .host import upload

log = logging.getLogger(__name__)

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
BLOCK = 16  # tokens per cache block


def supports(model) -> bool:
    """True for decoder-only models of the Llama layout without an active sliding window."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    layer = model.model.layers[0]
    return all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
        all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))


def row_buckets(max_rows: int) -> list[int]:
    """Decode batch sizes a graph is captured for: 1, 2, 4, 8, 16, 32, then steps of 32."""
    sizes = [b for b in (1, 2, 4, 8, 16) if b < max_rows] + list(range(32, max_rows, 32)) + [max_rows]
    return sorted(set(sizes))


def _attend_each(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float,
                 gqa: bool) -> torch.Tensor:
    """Causal attention prompt by prompt over its own length: q [k, Hq, T, D], k/v [k, Hkv, T, D] ->
    [k, Hq, T, D] (padding left zero). The kernel's choice and tiling then never see the batch.

    Not cuDNN's kernel: it builds a plan for each new length (every prompt length a job has), which made
    the first invariant run in a process 2-3x slower than the next on an H200 (RESULTS.md, issue 22)."""
    o = torch.zeros_like(q)
    with sdpa_kernel(_NO_PLANS):
        for j, n in enumerate(lengths):
            o[j, :, :n] = F.scaled_dot_product_attention(q[j:j + 1, :, :n], k[j:j + 1, :, :n], v[j:j + 1, :, :n],
                                                         is_causal=True, scale=scale, enable_gqa=gqa)[0]
    return o


_NO_PLANS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Dims:
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model) -> "Dims":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.num_attention_heads,
                   getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim, cfg.vocab_size)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype.itemsize


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused kernel where it is the plain kind (7 elementwise passes in eager)."""
    eps = getattr(norm, "variance_epsilon", None)
    # Gemma scales by 1 + weight; invariant.use() swapped in a row-wise kernel of its own.
    if eps is None or type(norm).__name__.startswith("Gemma") or getattr(norm, "_llmbatch_invariant", False):
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)


def _qkv(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """h [B, T, hidden] -> q [B, Hq, T, D], k and v [B, Hkv, T, D], rotary applied."""
    B, T, _ = h.shape
    q = attn.q_proj(h).view(B, T, -1, head_dim)
    k = attn.k_proj(h).view(B, T, -1, head_dim)
    v = attn.v_proj(h).view(B, T, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


class Runner:
    """Prefill into slots and decode all slots one step; owns the paged KV cache and the graphs."""

    def __init__(self, model, dtype: torch.dtype, use_graphs: bool = True, invariant: bool = False):
        """invariant: a row's logits must not depend on its batch (invariant.py). On CUDA the modules are
        invariant.use()'s, decode attention takes one split a row and prefill attention runs prompt by
        prompt; elsewhere each row's forward runs alone (`rowwise`)."""
        self.model, self.dtype = model, dtype
        self.dims = Dims.of(model)
        self.base = model.model
        self.device = self.base.embed_tokens.weight.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.invariant = invariant
        self.rowwise = invariant and self.device.type != "cuda"
        self.kv: torch.Tensor | None = None
        self.penalty_counts: torch.Tensor | None = None  # [P, V] int32, with the cache (allocate)
        self.penalty_seen: torch.Tensor | None = None  # [P, V] bool
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # (rows bucket, *adapters' key)
        self.seen: set[tuple] = set()
        self.graph_retry_at = 0  # after a failed capture, eager steps until this step count
        self.steps = 0
        self.stats = {"graphs_captured": 0, "graph_steps": 0, "eager_steps": 0, "capture_failures": 0}
        self.lora = None  # a lora.Registry, set by the engine when an adapter is first asked for

    # -- cache ----------------------------------------------------------------

    def allocate(self, slots: int, blocks: int, max_len: int, prefixes: int = 0, prefix_len: int = 0,
                 penalty_rows: int = 1) -> None:
        """A pool of `blocks` blocks, `slots` rows, rows up to max_len tokens; `prefixes` shared prompt
        prefixes of up to prefix_len tokens, each stored once; tables for `penalty_rows` rows with
        penalties at once (controls.py); plus the step's static tensors."""
        self.release()
        d = self.dims
        # Zeros, not empty: a masked key still meets V in the product (0 * NaN garbage = NaN).
        # One block more than asked: the last is scratch that free slots and padding point at.
        self.kv = torch.zeros(d.layers, 2, blocks + 1, d.kv_heads, BLOCK, d.head_dim, dtype=self.dtype,
                              device=self.device)
        self.scratch = blocks
        self.width = -(-max_len // BLOCK)
        self.block_table = torch.full((slots, self.width), blocks, dtype=torch.int32, device=self.device)
        self.free_blocks = list(range(blocks - 1, -1, -1))  # a stack: pop() takes the lowest id
        self.refs = [0] * blocks  # rows holding each block: several when they share a prompt (fork)
        self.held = 0  # free blocks promised to forks that follow a prefill
        self.owned: list[list[int]] = [[] for _ in range(slots)]  # host copy of each slot's blocks
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # [S] token fed to each row
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)  # [S] its position
        self.logits = torch.empty(slots, d.vocab, dtype=self.dtype, device=self.device)  # [S, V]
        # Shared prefixes: K/V [layers, 2, P, Hkv, L, D]; a row using prefix p keeps only its own tokens
        # in its blocks, from position offset = the prefix's length.
        self.prefix_kv = torch.zeros(d.layers, 2, prefixes, d.kv_heads, max(prefix_len, 1), d.head_dim,
                                     dtype=self.dtype, device=self.device) if prefixes else None
        self.prefix_lens = torch.zeros(max(prefixes, 1), dtype=torch.long, device=self.device)  # [P]
        self.prefix_of = torch.full((slots,), -1, dtype=torch.long, device=self.device)  # [S] -1: none
        self.offset = torch.zeros(slots, dtype=torch.long, device=self.device)  # [S] its prefix's length
        self.prefixes_live = 0  # prefix slots [0, n) decode attends to: part of the graph key
        # Penalty tables [P, V]: tokens generated (counts) and seen in the prompt or generated.
        self.penalty_counts = torch.zeros(penalty_rows, d.vocab, dtype=torch.int32, device=self.device)
        self.penalty_seen = torch.zeros(penalty_rows, d.vocab, dtype=torch.bool, device=self.device)
        if self.use_graphs:
            self.pool = torch.cuda.graph_pool_handle()

    def reset(self) -> None:
        """Every block free and every slot empty, at the start of a run: a run that failed leaves none held."""
        self.free_blocks = list(range(self.scratch - 1, -1, -1))
        self.refs = [0] * self.scratch
        self.held = 0
        self.owned = [[] for _ in range(self.slots)]
        self.block_table.fill_(self.scratch)
        self.pos.zero_()
        self.prefix_of.fill_(-1)
        self.offset.zero_()
        self.prefixes_live = 0

    def release(self) -> None:
        # Graphs hold pointers into the cache, so they go with it.
        self.kv = self.penalty_counts = self.penalty_seen = None
        self.graphs.clear()
        self.seen.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def slots(self) -> int:
        return self.block_table.shape[0]

    @property
    def blocks(self) -> int:
        return self.scratch

    @property
    def max_len(self) -> int:
        return self.width * BLOCK

    @staticmethod
    def penalty_bytes(rows: int, vocab: int) -> int:
        """Memory of the penalty tables for `rows` rows: counts int32 and seen bool, [rows, V] each."""
        return rows * vocab * (4 + 1)

    @staticmethod
    def blocks_for(tokens: int) -> int:
        return -(-tokens // BLOCK)

    def reserve(self, slot: int, tokens: int) -> bool:
        """Give slot the blocks for `tokens` positions; False (nothing taken) if the pool lacks them."""
        n = self.blocks_for(tokens)
        if n > len(self.free_blocks) - self.held or n > self.width:
            return False
        ids = [self.free_blocks.pop() for _ in range(n)]
        for b in ids:
            self.refs[b] = 1
        self.owned[slot] = ids
        self.block_table[slot, :n] = upload(ids, torch.int32, self.device)
        return True

    def can_take(self, blocks: int) -> bool:
        return blocks <= len(self.free_blocks) - self.held

    def hold(self, blocks: int) -> None:
        """Keep blocks back for forks that follow a prefill (reserve() then leaves them alone)."""
        self.held += blocks

    def release_held(self, blocks: int) -> None:
        self.held -= blocks

    @staticmethod
    def fork_cost(shared: int, tokens: int) -> int:
        """Blocks a fork of a `shared`-token prompt takes for a row of `tokens` positions."""
        return -(-tokens // BLOCK) - shared // BLOCK

    def fork(self, src: int, dst: int, shared: int, tokens: int) -> bool:
        """Slot dst continues slot src's first `shared` positions (a prompt with n choices) without a
        second prefill: src's full blocks are shared, the partly filled last one is copied (both rows
        write after it), and dst gets blocks of its own up to `tokens` positions. False if they lack."""
        full, n = shared // BLOCK, self.blocks_for(tokens)
        if n - full > len(self.free_blocks) or n > self.width:
            return False
        ids = self.owned[src][:full] + [self.free_blocks.pop() for _ in range(n - full)]
        for b in ids[:full]:
            self.refs[b] += 1
        for b in ids[full:]:
            self.refs[b] = 1
        if shared % BLOCK:
            self.kv[:, :, ids[full]].copy_(self.kv[:, :, self.owned[src][full]])
        self.owned[dst] = ids
        self.block_table[dst, :n] = upload(ids, torch.int32, self.device)
        if self.lora is not None:  # the choice runs the same adapter
            self.lora.move(src, dst)
        self.prefix_of[dst] = self.prefix_of[src]
        self.offset[dst] = self.offset[src]
        return True

    def free(self, slot: int) -> None:
        for b in reversed(self.owned[slot]):
            self.refs[b] -= 1
            if not self.refs[b]:
                self.free_blocks.append(b)
        self.owned[slot] = []
        self.block_table[slot].fill_(self.scratch)
        self.pos[slot] = 0
        self.prefix_of[slot] = -1
        self.offset[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Move slot src's row into the free slot dst (keeps live rows packed at the front)."""
        self.owned[dst], self.owned[src] = self.owned[src], []
        self.block_table[dst].copy_(self.block_table[src])
        self.tokens[dst] = self.tokens[src]
        self.pos[dst] = self.pos[src]
        self.prefix_of[dst] = self.prefix_of[src]
        self.offset[dst] = self.offset[src]
        self.block_table[src].fill_(self.scratch)
        self.pos[src] = 0
        self.prefix_of[src] = -1
        self.offset[src] = 0
        if self.lora is not None:  # the row's adapter moves with it
            self.lora.move(src, dst)

    # -- forward --------------------------------------------------------------

    def _write(self, layer: int, block: torch.Tensor, offset: torch.Tensor, key: torch.Tensor,
               val: torch.Tensor) -> None:
        """K/V [n, Hkv, D] into cache block ids `block` [n] at token offsets `offset` [n]."""
        self.kv[layer, 0, block, :, offset] = key
        self.kv[layer, 1, block, :, offset] = val

    @torch.inference_mode()
    def prefill_prefix(self, p: int, ids: list[int]) -> None:
        """A shared prefix's tokens, run once, into prefix slot p: later rows attend to it, not recompute it."""
        t = upload([ids], torch.long, self.device)
        T = t.shape[1]
        if self.lora is not None:
            self.lora.select(0, 0)  # prefixes are shared by rows without an adapter only
        x = self.base.embed_tokens(t)
        cos, sin = self.base.rotary_emb(x, torch.arange(T, device=self.device)[None])
        for i, layer in enumerate(self.base.layers):
            attn = layer.self_attn
            q, key, val = _qkv(attn, rms_norm(layer.input_layernorm, x), cos, sin, self.dims.head_dim)
            self.prefix_kv[i, 0, p, :, :T] = key[0]
            self.prefix_kv[i, 1, p, :, :T] = val[0]
            o = F.scaled_dot_product_attention(q, key, val, is_causal=True, scale=attn.scaling,
                                               enable_gqa=self.dims.q_heads != self.dims.kv_heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, T, -1))
            x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
        self.prefix_lens[p] = T

    @torch.inference_mode()
    def prefill(self, first_slot: int, ids: torch.Tensor, lengths: torch.Tensor, prefix: int = -1,
                prefix_len: int = 0) -> torch.Tensor:
        """Prompts ids [k, T], right-padded, into slots first_slot.. -> last real position's logits [k, V].

        With right padding a real query never sees a pad key under the causal mask, so the
        attention is plain causal (flash kernel, GQA without repeating K/V). Pad positions are
        written to the scratch block. With a shared prefix (slot `prefix`, prefix_len tokens, already
        in the prefix store), ids are the rows' own tokens after it: they sit at positions
        prefix_len.. and attend to the prefix too.
        """
        if not self.rowwise:
            return self._prefill(first_slot, ids, lengths, prefix, prefix_len)
        n = lengths.tolist()  # each prompt alone, unpadded (invariant.py)
        with invariant.dequantized(self.model):
            return torch.cat([self._prefill(first_slot + j, ids[j:j + 1, :n[j]], lengths[j:j + 1], prefix, prefix_len)
                              for j in range(len(n))])

    def _prefill(self, first_slot: int, ids: torch.Tensor, lengths: torch.Tensor, prefix: int,
                 prefix_len: int) -> torch.Tensor:
        k, T = ids.shape
        if self.lora is not None:  # arm the adapter hooks for these slots
            self.lora.select(first_slot, k)
        rows = slice(first_slot, first_slot + k)
        self.prefix_of[rows] = prefix
        self.offset[rows] = prefix_len if prefix >= 0 else 0
        x = self.base.embed_tokens(ids)
        positions = torch.arange(T, device=ids.device)[None].expand(k, T)  # own index
        cos, sin = self.base.rotary_emb(x, positions + (prefix_len if prefix >= 0 else 0))
        real = positions < lengths[:, None]  # [k, T]
        table = self.block_table[rows].long()  # [k, W]
        # Pad positions of a short row may lie past its blocks: they go to the scratch block.
        block = torch.where(real, table.gather(1, (positions // BLOCK).clamp(max=self.width - 1)),
                            self.scratch).reshape(-1)
        offset = (positions % BLOCK).reshape(-1)
        # With a prefix, query i (position prefix_len + i) sees keys [0, prefix_len + i]: causal aligned
        # to the lower right, which flash attention runs as such (no [T, L + T] mask materialized).
        mask = causal_lower_right(T, prefix_len + T) if prefix >= 0 else None
        own = lengths.tolist() if self.invariant and k > 1 and prefix < 0 else None  # attention prompt by prompt
        for i, layer in enumerate(self.base.layers):
            attn = layer.self_attn
            q, key, val = _qkv(attn, rms_norm(layer.input_layernorm, x), cos, sin, self.dims.head_dim)
            self._write(i, block, offset, key.transpose(1, 2).reshape(k * T, self.dims.kv_heads, -1),
                        val.transpose(1, 2).reshape(k * T, self.dims.kv_heads, -1))
            if prefix >= 0:
                pk = self.prefix_kv[i, 0, prefix, :, :prefix_len][None].expand(k, -1, -1, -1)
                pv = self.prefix_kv[i, 1, prefix, :, :prefix_len][None].expand(k, -1, -1, -1)
                key, val = torch.cat([pk, key], 2), torch.cat([pv, val], 2)
            if own is not None:
                o = _attend_each(q, key, val, own, attn.scaling, self.dims.q_heads != self.dims.kv_heads)
            else:
                o = F.scaled_dot_product_attention(q, key, val, is_causal=mask is None, attn_mask=mask,
                                                   scale=attn.scaling,
                                                   enable_gqa=self.dims.q_heads != self.dims.kv_heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(k, T, -1))
            x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
        last = x[torch.arange(k, device=x.device), lengths - 1]  # [k, hidden]
        if self.lora is not None:  # disarm, so a forward not ours (generate) sees the base
            self.lora.select(0, 0)
        return self.model.lm_head(rms_norm(self.base.norm, last))

    def _decode(self, B: int, max_len: int, first: int = 0) -> torch.Tensor:
        """One token for rows [first, first + B): self.tokens/pos -> logits [B, V]. Static shapes for B on CUDA.

        A row's own tokens are in its blocks from its offset (its prefix's length) on; a row with a
        shared prefix attends to it through attend_prefixes, and the two parts merge exactly."""
        d = self.dims
        live = slice(first, first + B)
        tokens, pos = self.tokens[live], self.pos[live]
        own = pos - self.offset[live]  # index of the fed token among the row's own
        table = self.block_table[live]
        block = table.long().gather(1, (own // BLOCK)[:, None])[:, 0]  # [B]
        offset = own % BLOCK
        x = self.base.embed_tokens(tokens[:, None])  # [B, 1, hidden]
        cos, sin = self.base.rotary_emb(x, pos[:, None])
        lens = own + 1
        # Invariant: one split a row, so no merge whose association follows the row count.
        splits = 1 if self.invariant else paged.splits_for(B, d.kv_heads)
        P = self.prefixes_live
        rows = paged.prefix_rows(self.prefix_of[live], P) if P and self.device.type == "cuda" else None
        for i, layer in enumerate(self.base.layers):
            attn = layer.self_attn
            q, key, val = _qkv(attn, rms_norm(layer.input_layernorm, x), cos, sin, d.head_dim)
            self._write(i, block, offset, key[:, :, 0], val[:, :, 0])
            if P:
                o = paged.attend_shared(q[:, :, 0], self.kv[i, 0], self.kv[i, 1], table, lens,
                                        attn.scaling, max_len, splits, self.prefix_kv[i, 0, :P],
                                        self.prefix_kv[i, 1, :P], self.prefix_of[live], self.prefix_lens[:P], rows)
            else:
                o, _ = paged.attend(q[:, :, 0], self.kv[i, 0], self.kv[i, 1], table, lens,
                                    attn.scaling, max_len, splits)  # [B, Hq, D]
            x = x + attn.o_proj(o.reshape(B, 1, -1))
            x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
        return self.model.lm_head(rms_norm(self.base.norm, x))[:, 0]

    @torch.inference_mode()
    def decode(self, B: int, max_pos: int) -> torch.Tensor:
        """Rows [0, B) bucketed up; returns logits [B, V] (a view into a buffer the next call overwrites)."""
        rb = next(b for b in row_buckets(self.slots) if b >= B)
        self.last_rows = rb
        self.steps += 1
        rows = B if not self.use_graphs else rb
        # Graphs with and without the LoRA path differ: the adapters' state is part of the key.
        key = (rb, self.prefixes_live, *(self.lora.select(0, rows, live=B) if self.lora is not None else ()))
        try:
            if self.rowwise:  # a batch of one a row, attending to exactly its own length
                with invariant.dequantized(self.model):
                    for b, p in enumerate(self.pos[:B].tolist()):
                        if self.lora is not None:
                            self.lora.select(b, 1)
                        self.logits[b:b + 1].copy_(self._decode(1, p + 1, first=b))
                self.last_rows = B
                self.stats["eager_steps"] += 1
            elif not self.use_graphs:
                self.logits[:B].copy_(self._decode(B, max_pos + 1))  # eager: exactly the live rows
                self.last_rows = B
                self.stats["eager_steps"] += 1
            elif key in self.graphs:
                self.graphs[key].replay()
                self.stats["graph_steps"] += 1
            elif key not in self.seen or self.steps < self.graph_retry_at:
                # The first step of a shape runs eagerly: it is real work and the warm-up for capture.
                self.logits[:rb].copy_(self._decode(rb, self.max_len))
                self.seen.add(key)
                self.stats["eager_steps"] += 1
            else:
                self._capture(key, rb)
        finally:
            if self.lora is not None:  # disarm (see prefill)
                self.lora.select(0, 0)
        return self.logits[:B]

    def _capture(self, key: tuple, rb: int) -> None:
        # Capture on a side stream by hand: torch.cuda.graph() also runs gc.collect() and
        # empty_cache() each time, which costs more than a big-batch step gains from a graph.
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=self.pool)
                try:
                    self.logits[:rb].copy_(self._decode(rb, self.max_len))
                finally:
                    graph.capture_end()
        except RuntimeError:
            # Often memory: decode eagerly for a while, then try again rather than never.
            self.stats["capture_failures"] += 1
            self.graph_retry_at = self.steps + 256 * self.stats["capture_failures"]
            log.warning("CUDA graph capture for %d rows failed; eager until step %d", rb, self.graph_retry_at,
                        exc_info=True)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.logits[:rb].copy_(self._decode(rb, self.max_len))
            self.stats["eager_steps"] += 1
            return
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graphs[key] = graph
        graph.replay()
        self.stats["graphs_captured"] += 1
        self.stats["graph_steps"] += 1
