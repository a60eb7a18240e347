"""Where bf16 pays: CPUs with native bf16 matmul (AVX512-BF16 or AMX), and CUDA devices.

On a CPU without them (AVX2 only) PyTorch emulates bf16 matmuls at about 1% of the fp32 rate, so
`autocast_dtype("auto")` picks fp32 there; `"bf16"` forces it anyway (for measurements).
"""
from __future__ import annotations

import contextlib
import functools

import torch


def native_bf16(capability: str, cpuinfo: str = "") -> bool:
    """Whether a CPU runs bf16 matmuls natively, from PyTorch's CPU capability string (e.g. "AVX2",
    "AVX512", "AVX512_BF16", "AMX") and the text of /proc/cpuinfo (its ``flags`` lines)."""
    cap = capability.upper()
    if "AMX" in cap or "BF16" in cap:
        return True
    flags = {f for line in cpuinfo.splitlines() if line.lower().startswith("flags") for f in line.split()}
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_has_native_bf16() -> bool:
    """This CPU's answer to :func:`native_bf16` (read once)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    return native_bf16(torch.backends.cpu.get_cpu_capability(), info)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """'auto' | 'fp32' | 'bf16' -> 'fp32' | 'bf16'."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str = "cpu"):
    dev = torch.device(device)
    if resolve_precision(precision, dev) == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def hi(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (bf16/fp16 activations under autocast go to fp32; fp64 stays fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def no_autocast(x: torch.Tensor):
    """A region where autocast is off on x's device (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()
