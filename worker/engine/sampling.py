"""Next-token choice for a whole batch on the device, with no per-row Python and no host sync.

Every row carries its own temperature, top-k, top-p and seed. Random draws come from a
counter-based generator keyed on (seed, position): a row's draw at a position depends only on
its own seed and that position, never on its slot, its batch-mates or what ran before, so a
seeded line gives the same tokens alone or in any batch. Unseeded rows get a random seed when
they are admitted.

Sampling is exact for the distribution it claims: temperature-scaled softmax, truncated to the
top_k most likely tokens and to the smallest set whose mass reaches top_p (tokens tied with the
last one kept are kept too), then one inverse-CDF draw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .host import upload
from .types import SamplingParams

# splitmix64 constants, as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_SEEDS = random.SystemRandom()
# CUDA's row-wise scan picks its thread shape by the number of rows (and takes cub's scan for one row),
# so a row's cumsum follows its batch. On CUDA the scans run over exactly this many rows (zero-padded).
SCAN_ROWS = 512


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """[B] int64 seeds and positions -> [B] float64 in (0, 1): splitmix64 of seed * golden + position."""
    x = seed * _GOLDEN + position  # wraps mod 2^64, as intended
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    x = x ^ _srl(x, 31)
    return (_srl(x, 11).double() + 0.5) * 2.0 ** -53


def int64(seed: int) -> int:
    """A seed as the signed 64-bit integer the sampler holds: seeds in [2^63, 2^64) (valid input) wrap to
    their two's-complement value, so the generator sees the same 64 bits; a seed and seed + 2^64 are one."""
    return (seed + (1 << 63)) % (1 << 64) - (1 << 63)


def row_seed(p: SamplingParams) -> int:
    """The seed a row samples with: its own (as int64), else a fresh random one (63 bits, positive)."""
    return int64(p.seed) if p.seed is not None else _SEEDS.getrandbits(63)


@dataclass
class RowSampling:
    """The sampling settings of a batch as tensors [B] on the logits' device, plus host-side flags."""

    temperature: torch.Tensor  # float32, 1 for greedy rows (unused there)
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, 0 = off
    seed: torch.Tensor  # int64
    greedy: torch.Tensor  # bool
    all_greedy: bool  # host-side, so the greedy fast path needs no device work
    max_top_k: int  # largest top_k among sampled rows; 0 = no row truncates by rank
    any_top_p: bool  # some sampled row has top_p < 1: needs the sorted probabilities

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], device: torch.device) -> "RowSampling":
        return cls(
            temperature=upload([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32, device),
            top_p=upload([p.top_p for p in params], torch.float32, device),
            top_k=upload([p.top_k for p in params], torch.long, device),
            seed=upload(seeds, torch.long, device),
            greedy=upload([p.temperature <= 0 for p in params], torch.bool, device),
            **cls.flags(params),
        )

    @staticmethod
    def flags(params: list[SamplingParams]) -> dict:
        """The host-side flags of these rows' settings."""
        sampled = [p for p in params if p.temperature > 0]
        return dict(all_greedy=not sampled, max_top_k=max([p.top_k for p in sampled if p.top_k > 0], default=0),
                    any_top_p=any(p.top_p < 1 for p in sampled))


class SlotSampling:
    """RowSampling's tensors for every slot [S], kept on the device and written by index when rows are
    admitted or moved, so a step's settings are views of slots [lo, lo + B): no host-to-device copy."""

    TENSORS = ("temperature", "top_p", "top_k", "seed", "greedy")  # RowSampling's [B] tensors, here [S]

    def __init__(self, slots: int, device: torch.device):
        self.device = device
        self.temperature = torch.ones(slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)
        self.greedy = torch.ones(slots, dtype=torch.bool, device=device)
        self.params: list[SamplingParams | None] = [None] * slots  # host copy, for RowSampling's flags
        self._view: tuple | None = None  # ((lo, B), RowSampling): valid until a slot changes

    def admit(self, lo: int, params: list[SamplingParams], seeds: list[int]) -> None:
        """Rows of slots [lo, lo + len(params)): one pinned upload per tensor (RowSampling.build)."""
        rows = RowSampling.build(params, seeds, self.device)
        for name in self.TENSORS:
            getattr(self, name)[lo:lo + len(params)] = getattr(rows, name)
        self.params[lo:lo + len(params)] = params
        self._view = None

    def move(self, src: int, dst: int) -> None:
        for name in self.TENSORS:
            t = getattr(self, name)
            t[dst] = t[src]  # a copy on the device
        self.params[dst], self.params[src] = self.params[src], None
        self._view = None

    def rows(self, lo: int, B: int) -> "RowSampling":
        """The settings of slots [lo, lo + B), every one admitted."""
        if self._view is None or self._view[0] != (lo, B):
            s = slice(lo, lo + B)
            self._view = ((lo, B), RowSampling(**{name: getattr(self, name)[s] for name in self.TENSORS},
                                               **RowSampling.flags(self.params[s])))
        return self._view[1]


def cumsum(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> its row-wise inclusive cumsum, each row's bits independent of B."""
    if not x.is_cuda:
        return x.cumsum(dim=-1)  # the CPU kernel scans each row on its own, in order
    B, V = x.shape
    padded = torch.cat([x, x.new_zeros(-B % SCAN_ROWS, V)]) if B % SCAN_ROWS else x
    return torch.cat([part.cumsum(dim=-1) for part in padded.split(SCAN_ROWS)])[:B]


def sample(logits: torch.Tensor, s: RowSampling, position: torch.Tensor) -> torch.Tensor:
    """logits [B, V], position [B] (of the token being chosen) -> next token ids [B]."""
    greedy_ids = logits.argmax(dim=-1)
    if s.all_greedy:
        return greedy_ids
    x = logits.float() / s.temperature[:, None]  # [B, V]
    vocab = x.shape[-1]
    if s.max_top_k:
        k = min(s.max_top_k, vocab)
        kth = x.topk(k, dim=-1).values  # [B, k], descending
        rank = (s.top_k.clamp(1, k) - 1)[:, None]
        floor = torch.where(s.top_k[:, None] > 0, kth.gather(1, rank), torch.full_like(rank, float("-inf"), dtype=x.dtype))
        x = x.masked_fill(x < floor, float("-inf"))
    probs = x.softmax(dim=-1)
    if s.any_top_p:
        desc = probs.sort(dim=-1, descending=True).values  # [B, V]
        # Keep a token while the mass strictly before it is under top_p; the first always stays.
        before = cumsum(desc) - desc
        kept = (before < s.top_p[:, None]).sum(dim=-1).clamp(min=1)  # [B]
        floor = desc.gather(1, (kept - 1)[:, None])  # the smallest kept probability
        # A row without top_p keeps everything: float32 sums over the vocabulary can reach 1 before its
        # last tokens, which would cut its tail only when a batch mate made this path run.
        floor = floor.masked_fill(s.top_p[:, None] >= 1, 0.0)
        probs = probs.masked_fill(probs < floor, 0.0)
    cdf = cumsum(probs)  # [B, V], in vocabulary order: any fixed order samples exactly
    u = (uniform(s.seed, position) * cdf[:, -1].double()).float()
    choice = torch.searchsorted(cdf, u[:, None]).squeeze(-1).clamp(max=vocab - 1)
    return torch.where(s.greedy, greedy_ids, choice)
