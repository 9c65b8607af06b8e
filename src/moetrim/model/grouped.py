"""Where torch's grouped GEMM (`torch.nn.functional.grouped_mm`) runs: shared by the expert modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_supports(x: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` has a kernel for x's device and dtype: CPU in fp32/bf16/fp16, CUDA in bf16 on
    SM80 and later (strides and pointers must still be 16-byte aligned; callers check their shapes)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False
