"""One way to measure memory, used by every trial: process peak RSS, and CUDA peaks reset per phase."""
from __future__ import annotations

import ctypes
import functools
import resource
import sys

import torch

GB = 1024 ** 3


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    fn = getattr(_glibc(), "mallinfo2", None)  # glibc >= 2.33
    if fn is None:
        return None
    fn.restype = _MallInfo2
    return fn


def heap_in_use_bytes() -> int | None:
    """Bytes the C heap has handed out and not taken back (glibc: arena chunks in use + mmapped chunks), where
    PyTorch's CPU tensors live; None off glibc."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return int(info.uordblks + info.hblkhd)


_heap = {"baseline": None, "peak": 0}


def start_heap_window() -> None:
    """Measure the heap's peak from now on, above what it holds now (the pre-model baseline)."""
    now = heap_in_use_bytes()
    _heap.update(baseline=now, peak=now or 0)


def sample_heap() -> None:
    """Called where a trial's memory peaks: after each forward (activations alive), backward (gradients) and
    optimizer step (its state), and after each evaluation batch. Unlike RSS, the heap's bytes in use fall
    when tensors are freed: glibc keeps freed pages mapped, so a long trial's RSS only ever grows (an adapter
    trial's RSS ends above full FT's on the demo), while what it holds at once does not."""
    if _heap["baseline"] is not None:
        now = heap_in_use_bytes()
        if now > _heap["peak"]:
            _heap["peak"] = now


def peak_tensor_memory_gb(model) -> float | None:
    """GB the method holds at its peak: the model's own tensors (weights, adapters, buffers, by their bytes)
    plus the most the heap held above what it held once the model was built (gradients, optimizer state,
    activations, evaluation batches)."""
    if _heap["baseline"] is None:
        return None
    tensors = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return (tensors + _heap["peak"] - _heap["baseline"]) / GB


def release_cached(device: str) -> None:
    """Hand back what an earlier trial of this process left cached, before a trial measures anything: a
    process that runs one trial after another (Tune's reuse_actors) would otherwise start each from the last
    one's freed-but-mapped heap pages (glibc keeps them: RSS) and cached CUDA blocks (reserved VRAM), and
    report the order the trials ran in as memory. A fresh process has nothing to hand back."""
    import gc

    gc.collect()
    trim = getattr(_glibc(), "malloc_trim", None)
    if trim is not None:  # elsewhere nothing is kept this way
        trim(0)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


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


def trial_host_peak_gb(baseline: float | None) -> float:
    """The whole process's peak RSS over a trial's window (from reset_host_peak on): in a process that ran
    earlier trials, theirs is not this one's. Where the reset was refused (`baseline` None): the lifetime
    peak, which is the trial's own in a process that runs one trial."""
    return host_peak_since_reset_gb() if baseline is not None else peak_host_rss_gb()


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
