"""`make bench`: routing throughput, expert-parallel dispatch and training-step benchmarks."""

import os

# Before torch is imported: allocate big CPU tensors on transparent huge pages. PyTorch's CPU
# allocator returns every tensor over glibc's 32 MB mmap threshold to the OS when freed, so the
# next one faults in again 4 KiB at a time; on a VM that is ~0.6 ms per MB (measured here), enough
# to dominate a batched MoE layer. Set THP_MEM_ALLOC_ENABLE=0 to measure without it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
