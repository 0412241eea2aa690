# Sourced at the start of each GPU call (issue 23), after `benchmarks/gpu_carry.sh install` ran on that machine:
# the carried packages and llmbatch on the path, the carried redis-server on PATH (its libraries beside it), and
# NVLink multicast off (the device service's rule for multi-GPU machines).
export PYTHONPATH=/tmp/site:/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/redis:$PATH
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/bench
