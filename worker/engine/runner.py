"""A Llama-family forward over the model's own modules, with a slot KV cache and CUDA graphs.

The cache holds S sequences, one per row ("slot"); row b's tokens fill columns [0, n_b). No
padding is stored: a decode step writes row b's new K/V at column n_b, its own position, and
attends to columns <= n_b. Rows of any prompt length decode together, a finished row is
replaced by a new prompt (continuous batching), and for a given (rows, columns) bucket the
decode step has static shapes, so on CUDA it is captured once as a graph and replayed.

The linear layers are the model's own (bitsandbytes NF4), as are the norms and the rotary
embedding, so the numbers match the transformers forward; only attention and the cache are ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
COLUMN_BUCKET = 128  # decode attends to the first ceil((max n_b + 1) / 128) * 128 columns


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
    if eps is None or type(norm).__name__.startswith("Gemma"):  # Gemma scales by 1 + weight
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
    """Prefill into slots and decode all slots one step; owns the KV cache and the graphs."""

    def __init__(self, model, dtype: torch.dtype, use_graphs: bool = True):
        self.model, self.dtype = model, dtype
        self.dims = Dims.of(model)
        self.base = model.model
        self.device = self.base.embed_tokens.weight.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.kv: torch.Tensor | None = None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.seen: set[tuple[int, int]] = set()
        self.stats = {"graphs_captured": 0, "graph_steps": 0, "eager_steps": 0}
        self.lora = None  # issue 11: a lora.Registry, set by the engine; each slot's adapter lives there

    # -- cache ----------------------------------------------------------------

    def allocate(self, slots: int, columns: int) -> None:
        """KV cache [layers, 2, S, Hkv, L, D] plus the decode step's static inputs and output."""
        self.release()
        d = self.dims
        # Zeros, not empty: masked columns still meet V in the product (0 * NaN garbage = NaN).
        self.kv = torch.zeros(d.layers, 2, slots, d.kv_heads, columns, d.head_dim, dtype=self.dtype, device=self.device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # [S] token fed to each row
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)  # [S] its position = write column
        self.logits = torch.empty(slots, d.vocab, dtype=self.dtype, device=self.device)  # [S, V]
        if self.use_graphs:
            self.pool = torch.cuda.graph_pool_handle()

    def release(self) -> None:
        # Graphs hold pointers into the cache, so they go with it.
        self.kv = None
        self.graphs.clear()
        self.seen.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def slots(self) -> int:
        return self.kv.shape[2]

    @property
    def columns(self) -> int:
        return self.kv.shape[4]

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's cache row into slot dst (keeps live rows packed at the front)."""
        self.kv[:, :, dst].copy_(self.kv[:, :, src])
        if self.lora is not None:  # issue 11: the row's adapter moves with it
            self.lora.move(src, dst)

    # -- forward --------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, first_slot: int, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Prompts ids [k, T], right-padded, into slots first_slot.. -> last real position's logits [k, V].

        With right padding a real query never sees a pad key under the causal mask, so the
        attention is plain causal (flash kernel, GQA without repeating K/V).
        """
        k, T = ids.shape
        rows = slice(first_slot, first_slot + k)
        if self.lora is not None:  # issue 11: arm the adapter hooks for these slots
            self.lora.select(first_slot, k)
        x = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(x, torch.arange(T, device=ids.device)[None].expand(k, T))
        for i, layer in enumerate(self.base.layers):
            attn = layer.self_attn
            q, key, val = _qkv(attn, rms_norm(layer.input_layernorm, x), cos, sin, self.dims.head_dim)
            self.kv[i, 0, rows, :, :T] = key
            self.kv[i, 1, rows, :, :T] = val
            o = F.scaled_dot_product_attention(q, key, val, is_causal=True, scale=attn.scaling,
                                               enable_gqa=self.dims.q_heads != self.dims.kv_heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(k, T, -1))
            x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
        last = x[torch.arange(k, device=x.device), lengths - 1]  # [k, hidden]
        if self.lora is not None:  # issue 11: disarm, so a forward not ours (generate) sees the base
            self.lora.select(0, 0)
        return self.model.lm_head(rms_norm(self.base.norm, last))

    def _decode(self, B: int, columns: int) -> torch.Tensor:
        """One token for rows [0, B): self.tokens/pos [B] -> logits [B, V]. Static shapes for (B, columns)."""
        d = self.dims
        tokens, pos = self.tokens[:B], self.pos[:B]
        rows = torch.arange(B, device=self.device)
        x = self.base.embed_tokens(tokens[:, None])  # [B, 1, hidden]
        cos, sin = self.base.rotary_emb(x, pos[:, None])
        mask = (torch.arange(columns, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]  # [B,1,1,L]
        for i, layer in enumerate(self.base.layers):
            attn = layer.self_attn
            q, key, val = _qkv(attn, rms_norm(layer.input_layernorm, x), cos, sin, d.head_dim)
            cache_k, cache_v = self.kv[i, 0], self.kv[i, 1]  # [S, Hkv, L, D]
            cache_k[rows, :, pos] = key[:, :, 0]
            cache_v[rows, :, pos] = val[:, :, 0]
            # GQA without repeating K/V: the G query heads sharing a KV head act as G query rows.
            q = q.reshape(B, d.kv_heads, d.q_heads // d.kv_heads, d.head_dim)
            o = F.scaled_dot_product_attention(q, cache_k[:B, :, :columns], cache_v[:B, :, :columns],
                                               attn_mask=mask, scale=attn.scaling)  # [B, Hkv, G, D]
            x = x + attn.o_proj(o.reshape(B, 1, -1))
            x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
        return self.model.lm_head(rms_norm(self.base.norm, x))[:, 0]

    @torch.inference_mode()
    def decode(self, B: int, max_pos: int) -> torch.Tensor:
        """Rows [0, B) bucketed up; returns logits [B, V] (a view into a buffer the next call overwrites)."""
        rb = next(b for b in row_buckets(self.slots) if b >= B)
        cols = min(self.columns, -(-(max_pos + 1) // COLUMN_BUCKET) * COLUMN_BUCKET)
        key = (rb, cols)
        if self.lora is not None:  # issue 11: arm the hooks; graphs with and without the LoRA path differ
            key += self.lora.select(0, rb, live=B)
        self.last_rows = rb
        if key in self.graphs:
            self.graphs[key].replay()
            self.stats["graph_steps"] += 1
        elif not self.use_graphs or key not in self.seen:
            # The first step of a shape runs eagerly: it is real work and the warm-up for capture.
            self.logits[:rb].copy_(self._decode(rb, cols))
            self.seen.add(key)
            self.stats["eager_steps"] += 1
        else:
            # Capture on a side stream by hand: torch.cuda.graph() also runs gc.collect() and
            # empty_cache() each time, which costs more than a big-batch step gains from a graph.
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(stream):
                    graph.capture_begin(pool=self.pool)
                    try:
                        self.logits[:rb].copy_(self._decode(rb, cols))
                    finally:
                        graph.capture_end()
            except RuntimeError:
                log.exception("CUDA graph capture failed; decoding eagerly from now on")
                self.use_graphs = False
                return self.decode(B, max_pos)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graphs[key] = graph
            graph.replay()
            self.stats["graphs_captured"] += 1
            self.stats["graph_steps"] += 1
        if self.lora is not None:  # issue 11: disarm (see prefill)
            self.lora.select(0, 0)
        return self.logits[:B]
