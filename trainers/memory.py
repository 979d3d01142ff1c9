"""One way to measure memory, used by every trial: process peak RSS, and CUDA peaks reset per phase."""
from __future__ import annotations

import resource
import sys

import torch

GB = 1024 ** 3


_peak_before_reset = 0.0  # the lifetime peak as it stood at the last reset_host_peak


def peak_host_rss_gb() -> float:
    """Peak resident set of this process since it started (Linux reports KiB, macOS bytes), across resets."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(_peak_before_reset, peak / GB if sys.platform == "darwin" else peak * 1024 / GB)


def reset_host_peak() -> float | None:
    """Start a new peak-RSS window: Linux resets the process's high-water mark to its current RSS (writing 5
    to /proc/self/clear_refs). Returns that RSS in GB, the baseline a phase's peak is measured above; None
    where the kernel does not allow it (the figure is then absent, not guessed)."""
    global _peak_before_reset
    _peak_before_reset = peak_host_rss_gb()  # the reset may lower what getrusage reports
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmRSS") * 1024 / GB
    except (OSError, ValueError):
        return None


def host_peak_since_reset_gb() -> float:
    """Peak RSS since the last reset_host_peak (the process's lifetime peak if it was never reset)."""
    return _status_kb("VmHWM") * 1024 / GB


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"{field} not in /proc/self/status")


def reset_cuda_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_peaks(device: str) -> dict[str, float]:
    """max_memory_allocated/reserved since the last reset; empty on CPU (the metrics are then absent)."""
    if not device.startswith("cuda"):
        return {}
    torch.cuda.synchronize()
    return {"peak_vram_allocated_gb": torch.cuda.max_memory_allocated() / GB,
            "peak_vram_reserved_gb": torch.cuda.max_memory_reserved() / GB}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return f"cpu:{platform.processor() or platform.machine()}"


def nvml_process_gb(device: str) -> dict[str, float]:
    """This process's GPU memory as the driver reports it (allocator pool + CUDA context + libraries), the
    figure nvidia-smi shows and that decides whether a neighbour's trial fits. Empty on CPU, or when NVML
    is unavailable (no pynvml, or a container that hides other processes)."""
    if not device.startswith("cuda"):
        return {}
    try:
        import os

        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == os.getpid() and p.usedGpuMemory is not None]
        return {"vram_nvml_gb": used[0] / GB} if used else {}  # record.PEAK_VRAM_NVML_GB
    except Exception:  # noqa: BLE001 - optional figure
        return {}
