"""Host <-> device traffic of the slot loop, which must never wait for the step it just launched.

upload: host values to the device through pinned memory, copied with non_blocking=True. A plain
`torch.tensor(values, device=cuda)` copies from pageable memory and synchronizes the stream: the
host would wait for every queued step. Each upload takes a fresh pinned tensor from torch's
caching host allocator, which records an event on the copy and hands that memory out again only
once the event has completed: no buffer is rewritten while its copy is pending.

Readback: every device -> host read of the loop. `launch()` numbers each queued forward (a decode
step or a prefill chunk); `copy()` starts the asynchronous copy of that step's results to pinned
memory; `read()` waits for it, and counts a host wait in `stats.host_waits` when the copy belongs
to the step launched last: then the device has nothing queued behind it and idles while the host
works. Reading an older step's results, with a newer one queued, is the overlap the loop is built
on. On the CPU nothing is asynchronous, but the count is the same: it is a property of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (nested for 2-D) or CPU tensor as a tensor on `device`, without waiting for the device."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class Copy:
    """Results of launch `step` being copied to the host: pinned tensors, done when `event` is."""

    step: int
    host: list[torch.Tensor]
    event: torch.cuda.Event | None
    values: list | None = field(default=None)  # host.tolist() of each, once read


class Readback:
    def __init__(self, stats):
        self.stats = stats  # has host_waits
        self.step = 0  # the last launch's number
        self.counted = -1  # the launch a wait was last counted for: one count a step

    def launch(self) -> int:
        """A forward was queued: its results belong to the returned step."""
        self.step += 1
        return self.step

    def copy(self, step: int, tensors: list[torch.Tensor]) -> Copy:
        """Start copying device tensors of launch `step` to the host."""
        if not tensors or tensors[0].device.type != "cuda":
            return Copy(step, [t.clone() for t in tensors], None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Copy(step, host, event)

    def read(self, c: Copy) -> list:
        """The copied tensors as lists, waiting for them if needed (read once, then kept)."""
        if c.values is None:
            if c.step == self.step and self.counted != c.step:
                self.stats.host_waits += 1
                self.counted = c.step
            if c.event is not None:
                c.event.synchronize()
            c.values = [h.tolist() for h in c.host]
        return c.values
