"""The CUDA NF4 kernel (nf4_mma.py) run alone, one process per call: for Nsight Compute, or to try a build
option in isolation (a crash then takes only this process).

  python benchmarks/nf4_mma_ncu.py 14336x4096 1,32               # 3 launches per row count (ncu --launch-skip 2)
  python benchmarks/nf4_mma_ncu.py 14336x4096 1,8,200 lut=1       # also: bits equal to the default build's?
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from benchmarks.nf4 import _opts, quantized  # noqa: E402
from llmbatch.worker.engine import nf4_mma  # noqa: E402

try:
    N, K = (int(v) for v in sys.argv[1].split("x"))
    rows = [int(m) for m in sys.argv[2].split(",")]
    opts = _opts(sys.argv[3]) if len(sys.argv) > 3 else {}
except (IndexError, ValueError) as exc:
    sys.exit(f"usage: nf4_mma_ncu.py NxK ROWS[,ROWS...] [OPTIONS]  ({exc})")
packed, qs, _ = quantized(N, K, False, 1)
for M in rows:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        y = nf4_mma.matmul(x, packed, qs, **opts)
    if opts:
        torch.cuda.synchronize()
        print(M, opts, "equal to the default build:", torch.equal(y, nf4_mma.matmul(x, packed, qs)), flush=True)
torch.cuda.synchronize()
