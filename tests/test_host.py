"""Host <-> device traffic of the slot loop (worker/engine/host.py): uploads, and reads that count waits."""

from __future__ import annotations

import torch

from llmbatch.worker.engine.host import Readback, upload
from llmbatch.worker.engine.scheduler import Stats


def test_upload_keeps_values_and_dtype():
    t = upload([[1, 2], [3, 4]], torch.int32, torch.device("cpu"))
    assert t.dtype == torch.int32 and t.tolist() == [[1, 2], [3, 4]]


def test_a_read_counts_a_wait_only_for_the_launch_just_queued():
    stats = Stats()
    rb = Readback(stats)
    a = rb.copy(rb.launch(), [torch.tensor([1, 2])])
    b = rb.copy(rb.launch(), [torch.tensor([3]), torch.tensor([[0.5]])])
    assert rb.read(a) == [[1, 2]]  # launch 1, with launch 2 queued behind it: overlapped
    assert stats.host_waits == 0
    assert rb.read(b) == [[3], [[0.5]]]  # launch 2 is the last one queued: the device idles
    assert stats.host_waits == 1
    c = rb.copy(2, [torch.tensor([4])])  # another result of the same launch: still one wait that step
    rb.read(c)
    rb.read(b)  # read once, then kept
    assert stats.host_waits == 1
    d = rb.copy(rb.launch(), [torch.tensor([5])])
    rb.read(d)
    assert stats.host_waits == 2
