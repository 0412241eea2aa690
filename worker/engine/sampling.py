"""Next-token choice, per row: each row of a batch carries its own temperature, top-p, top-k, seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .types import SamplingParams


@dataclass
class RowSampling:
    """The sampling settings of a batch as tensors: [B] each, on the logits' device."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    greedy: torch.Tensor  # bool [B]
    # A seeded row draws from its own generator, so its output does not depend on its batch-mates.
    generators: list[torch.Generator | None]
    all_greedy: bool  # host-side, so the greedy fast path needs no device sync

    @staticmethod
    def generator(p: SamplingParams, device: torch.device) -> torch.Generator | None:
        if p.temperature > 0 and p.seed is not None:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed)
            return g
        return None

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device,
              generators: list[torch.Generator | None] | None = None) -> "RowSampling":
        """generators: each row's own (kept across steps by the caller); fresh ones when None."""
        gens = generators if generators is not None else [cls.generator(p, device) for p in params]
        return cls(
            temperature=torch.tensor([max(p.temperature, 1e-5) for p in params], device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            top_k=torch.tensor([p.top_k for p in params], device=device, dtype=torch.long),
            greedy=torch.tensor([p.temperature <= 0 for p in params], device=device),
            generators=gens,
            all_greedy=all(p.temperature <= 0 for p in params),
        )

    def select(self, keep: torch.Tensor) -> "RowSampling":
        idx = keep.tolist()
        return RowSampling(self.temperature[keep], self.top_p[keep], self.top_k[keep], self.greedy[keep],
                           [self.generators[i] for i in idx], self.all_greedy)


def sample(logits: torch.Tensor, s: RowSampling) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    greedy_ids = logits.argmax(dim=-1)
    if s.all_greedy:
        return greedy_ids
    logits = logits.float() / s.temperature[:, None]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(s.top_k > 0, s.top_k, vocab)[:, None]
    drop = rank >= k
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token once the mass before it already reaches top_p; the first token always stays.
    drop |= (probs.cumsum(dim=-1) - probs) >= s.top_p[:, None]
    drop[:, 0] = False  # even top_p=0 or top_k=1 keeps the most likely token
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    choice = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    unseeded = [i for i, g in enumerate(s.generators) if g is None]
    if unseeded:
        choice[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(-1)
    for i, g in enumerate(s.generators):
        if g is not None:
            choice[i] = torch.multinomial(probs[i], 1, generator=g).squeeze(-1)
    sampled = sorted_ids.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(s.greedy, greedy_ids, sampled)
