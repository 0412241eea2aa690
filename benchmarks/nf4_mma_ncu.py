"""One launch of the CUDA NF4 kernel per row count, for Nsight Compute (ncu --launch-skip picks it)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from benchmarks.nf4 import quantized  # noqa: E402
from llmbatch.worker.engine import nf4_mma  # noqa: E402

N, K = (int(v) for v in sys.argv[1].split("x"))
packed, qs, _ = quantized(N, K, False, 1)
for M in (int(m) for m in sys.argv[2].split(",")):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        nf4_mma.matmul(x, packed, qs)
torch.cuda.synchronize()
