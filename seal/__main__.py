"""`python -m seal`: what runs started on this machine get (allocator, torch, the CPU's bf16, GPUs)."""

import torch

from seal import allocator
from seal.models import cpu_supports_bf16

print(f"allocator: {allocator.in_use()}")
print(f"torch: {torch.__version__}, {torch.get_num_threads()} threads")
print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, fast bf16: {'yes' if cpu_supports_bf16() else 'no'}")
print(f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
