"""What a benchmark ran on: CPU model, instruction-set extensions, threads, libtorch's
kernel level, and the machine's matrix-multiply rate (the ceiling a UNet step can reach).
Every benchmark prints `describe()` first, so its ratios can be read against the hardware."""

import platform
import time
from pathlib import Path

import torch

# The extensions that decide which kernels libtorch and oneDNN pick.
EXTENSIONS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)


def cpu_model_and_flags() -> tuple:
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if flags and model:
                break
    return model, [e for e in EXTENSIONS if e in flags]


def sgemm_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    """fp32 matrix-multiply rate at the current thread count, best of repeated n×n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def describe() -> dict:
    model, extensions = cpu_model_and_flags()
    info = {
        "cpu": model,
        "extensions": extensions,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "sgemm_gflops": round(sgemm_gflops(), 1),
    }
    print(
        f"machine: {info['cpu']}; extensions {' '.join(extensions) or 'none'}; "
        f"{info['threads']} threads; torch {info['torch']} ({info['torch_cpu_capability']} kernels); "
        f"sgemm {info['sgemm_gflops']} GFLOP/s"
    )
    return info


def flops(module: torch.nn.Module, *args, **kwargs) -> int:
    """Floating-point operations of one call (matmuls and convolutions, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return counter.get_total_flops()
