"""Shared prompt prefixes: prompts that share at least `min_tokens` leading tokens (a system prompt,
few-shot examples) are grouped, and each group's prefix is prefilled once into a slot of the runner's
prefix store, which its rows' decode attends to (forward.py, paged.attend_prefixes). A slot is held
while a row that uses its prefix waits or runs, and released on every path a row leaves by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .forward import Runner

if TYPE_CHECKING:
    from .scheduler import Prompt, Stats


@dataclass(eq=False)
class Prefix:
    """A token prefix several waiting or live rows share; prefilled once into a store slot."""

    ids: list[int]
    order: int  # groups are admitted one after another, in this order
    slot: int = -1  # in the runner's prefix store, once prefilled
    users: int = 0  # rows (choices count) waiting or live that use it


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Prefixes:
    """Finds prompts sharing a token prefix and keeps each shared prefix in the runner's store once."""

    def __init__(self, runner: Runner, min_tokens: int, stats: Stats):
        self.runner, self.min_tokens, self.stats = runner, min_tokens, stats
        self.store = runner.prefix_kv.shape[2] if min_tokens > 0 and runner.prefix_kv is not None else 0
        self.max_len = runner.prefix_kv.shape[4] if self.store else 0
        self.known: list[Prefix] = []
        self.slots: list[Prefix | None] = [None] * self.store
        self.groups = 0

    def assign(self, items: list[Prompt], new: list[int]) -> None:
        """Give the new items a shared prefix: one that is stored already, or one among themselves."""
        if not self.store:
            return
        free = []
        for i in new:
            it = items[i]
            if it.adapter >= 0:
                continue
            hit = next((p for p in self.known if p.users and len(it.ids) > len(p.ids)
                        and it.ids[:len(p.ids)] == p.ids), None)
            if hit is not None:
                it.prefix, hit.users = hit, hit.users + it.params.n
            else:
                free.append(i)
        order = sorted(free, key=lambda i: items[i].ids)  # shared prefixes end up next to each other
        group: list[int] = []
        shared = 0
        for a, b in zip(order, order[1:] + [None]):
            common = _common(items[a].ids, items[b].ids) if b is not None else 0
            if not group:
                group, shared = [a], common
            if common >= self.min_tokens:
                group.append(b)
                shared = min(shared, common)
                continue
            self._make(items, group, shared)
            group = []

    def _make(self, items: list[Prompt], group: list[int], shared: int) -> None:
        # Every member keeps at least its last token for itself: its logits come from its own part.
        n = min(shared, self.max_len, min(len(items[i].ids) for i in group) - 1)
        if len(group) < 2 or n < self.min_tokens:
            return
        p = Prefix(items[group[0]].ids[:n], self.groups)
        self.groups += 1
        self.known.append(p)
        for i in group:
            items[i].prefix, p.users = p, p.users + items[i].params.n

    def ensure(self, p: Prefix) -> bool:
        """Prefill p into a free store slot if it is not there; False if every slot is busy."""
        if p.slot >= 0:
            return True
        free = next((k for k, q in enumerate(self.slots) if q is None), None)
        if free is None:
            return False
        self.runner.prefill_prefix(free, p.ids)
        self.stats.prefill_tokens += len(p.ids)
        self.stats.prefill_slots += len(p.ids)
        self.slots[free], p.slot = p, free
        self.runner.prefixes_live = max(self.runner.prefixes_live, free + 1)
        return True

    def release(self, p: Prefix, rows: int = 1) -> None:
        p.users -= rows
        if p.users <= 0 and p.slot >= 0:
            self.slots[p.slot], p.slot = None, -1
            live = [k for k, q in enumerate(self.slots) if q is not None]
            self.runner.prefixes_live = max(live) + 1 if live else 0
